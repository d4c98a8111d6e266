"""Figures for the book: one seaborn style, static (HTML) and live (JupyterLab) sliders."""

from nested_lab.viz.dashboard import LiveDashboard, dashboard_figure
from nested_lab.viz.live_slider import live_slider
from nested_lab.viz.static_slider import StaticSlider, static_slider
from nested_lab.viz.style import colors, use_book_style

__all__ = ["LiveDashboard", "StaticSlider", "colors", "dashboard_figure", "live_slider", "static_slider",
           "use_book_style"]
