"""Figures for the book: one seaborn style, static (HTML) and live (JupyterLab) sliders, the CMS
update schedule; glue_all puts computed numbers into the prose."""

from nested_lab.viz.dashboard import LiveDashboard, dashboard_figure
from nested_lab.viz.glue import glue_all
from nested_lab.viz.live_slider import live_slider
from nested_lab.viz.schedule import schedule_figure
from nested_lab.viz.static_slider import StaticSlider, static_slider
from nested_lab.viz.style import colors, use_book_style

__all__ = ["LiveDashboard", "StaticSlider", "colors", "dashboard_figure", "glue_all", "live_slider", "schedule_figure",
           "static_slider", "use_book_style"]
