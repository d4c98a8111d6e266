"""Chapter 6: the multi-scale theory of the stability-plasticity dilemma, tested on a small GPT.

The setting: a character-level GPT pretrained on the standard library's documentation (cached in
the build directory, keyed by its config and the package's code), then fine-tuned on a behaviour
it never saw -- answer a context with its last word's initial, capitalised
(:mod:`nested_lab.data.decisions`).
A :class:`Recipe` holds one named option per defence of the note; :func:`finetune` runs one
recipe for one seed and measures what the chapter needs; the section functions below are loops
over recipes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import nested_lab
from nested_lab import runtime
from nested_lab.data.corpus import CharCorpus, stdlib_text
from nested_lab.data.decisions import DecisionTask
from nested_lab.models.gpt import GPT, GPTConfig
from nested_lab.optim.apollo import APOLLO
from nested_lab.parameters import check_choice, check_positive_ints, check_range
from nested_lab.train import decisions as rows
from nested_lab.train import plasticity

OPTIMIZERS = ("adamw", "apollo", "apollo_mini")
DATA = ("narrow", "diverse")
MEMORIES = ("weights", "two_stage")
ACQUIRED = 0.5  # judge accuracy at which a behaviour counts as acquired
TOLERANCE = 0.05  # nats of general-text loss a fine-tuning may cost and still "retain" the model


# ----- pretraining, cached ---------------------------------------------------------------------

@dataclass(frozen=True)
class Pretraining:
    """The pretrained model's architecture and its training run (AdamW, one-cycle schedule)."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 128
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(steps=self.steps, batch_size=self.batch_size)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("seed", self.seed, 0, integer=True)

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd)


QUICK_PRETRAINING = Pretraining(n_embd=48, block_size=96, steps=400)


@dataclass
class Pretrained:
    model: GPT
    corpus: CharCorpus
    config: Pretraining
    val_curve: list[tuple[int, float]]
    seconds: float
    cached: bool


def pretrained(config: Pretraining, cache: Path | None = None, device: str | None = None) -> Pretrained:
    """The pretrained model for ``config``: loaded from the cache when the same config and package
    code trained it before, else trained (with a progress bar) and stored."""
    corpus = CharCorpus.from_text(stdlib_text())
    path = (cache or runtime.build_directory() / "cache") / f"gpt-{cache_key(config)}.pt"
    dev = runtime.device(device)
    model = GPT(config.model_config(corpus.vocab_size)).to(dev)
    if path.exists():
        saved = torch.load(path, map_location=dev)
        model.load_state_dict(saved["weights"])
        return Pretrained(model.eval(), corpus, config, saved["val_curve"], saved["seconds"], cached=True)
    start = time.perf_counter()
    with runtime.seeded(config.seed):
        model = GPT(config.model_config(corpus.vocab_size)).to(dev)
    curve = _pretrain(model, corpus, config)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": model.state_dict(), "val_curve": curve, "seconds": seconds}, path)
    return Pretrained(model.eval(), corpus, config, curve, seconds, cached=False)


def cache_key(config: Pretraining) -> str:
    """A hash of the config and of every source file of the package."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for source in sorted(Path(nested_lab.__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _pretrain(model: GPT, corpus: CharCorpus, config: Pretraining) -> list[tuple[int, float]]:
    gen = runtime.generator(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.1)
    curve, every = [], max(config.steps // 10, 1)
    for step in runtime.progress(range(config.steps), desc="pretraining", leave=False):
        x, y = (t.to(_device(model)) for t in corpus.sequences("train", config.batch_size, config.block_size, gen))
        loss = F.cross_entropy(model.logits(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % every == 0:
            curve.append((step + 1, general_loss(model, corpus, 32)))
    return curve


def general_loss(model: GPT, corpus: CharCorpus, windows: int, seed: int = 12345) -> float:
    """Mean next-character loss on ``windows`` fixed held-out windows of the documentation text."""
    return general_scores(model, corpus, windows, seed)[0]


def general_scores(model: GPT, corpus: CharCorpus, windows: int, seed: int = 12345) -> tuple[float, float]:
    """Next-character loss and top-1 accuracy on ``windows`` fixed held-out windows."""
    x, y = corpus.sequences("val", windows, model.config.block_size, runtime.generator(seed))
    with torch.no_grad():
        logits = model.logits(x.to(_device(model))).flatten(0, 1)
    y = y.to(logits.device).flatten()
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def flattening(curve: Sequence[tuple[int, float]]) -> float:
    """Relative drop of the held-out loss over the last fifth of pretraining (0 = flat)."""
    losses = [loss for _, loss in curve]
    k = max(len(losses) // 5, 1)
    return (losses[-k - 1] - losses[-1]) / losses[-k - 1]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----- the fine-tuning setting -----------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """Sizes of a fine-tuning run."""

    steps: int = 300
    experiences: int = 256  # real (context, decision) examples available
    eval_every: int = 50
    eval_examples: int = 128
    retention_windows: int = 32
    dream_every: int = 25
    dream_count: int = 64
    held_out_topics: int = 8
    rule: str = "last_initial_capital"

    def __post_init__(self) -> None:
        check_positive_ints(**{k: v for k, v in asdict(self).items() if k != "rule"})


QUICK_SCALE = Scale(steps=150, experiences=256, eval_every=50, eval_examples=64, retention_windows=16,
                    dream_every=20, dream_count=48)


@dataclass
class Setting:
    """The pretrained model, the task, and the fixed evaluation sets of one chapter run."""

    base: Pretrained
    task: DecisionTask
    scale: Scale
    same_topic: list[str]  # held-out contexts of the fine-tuning topics
    novel: list[str]  # contexts of held-out topics
    base_general: float = 0.0
    base_general_accuracy: float = 0.0
    base_behaviour: float = 0.0  # the pretrained model's judge accuracy
    initial_accuracy: tuple[float, float] = (0.0, 0.0)  # an untrained model's: general text, behaviour
    base_context: float = 0.0
    fisher: dict = field(default_factory=dict)


def setting(base: Pretrained, scale: Scale, seed: int) -> Setting:
    """Split the topics and draw the evaluation sets with ``seed``."""
    gen = runtime.generator(seed)
    task = DecisionTask.split(base.corpus.vocabulary, scale.held_out_topics, gen, rule=scale.rule)
    same = contexts(task, task.train_topics, scale.eval_examples, gen, "test")
    novel = contexts(task, task.held_out_topics, scale.eval_examples, gen, "all")
    out = Setting(base, task, scale, same, novel)
    out.base_general, out.base_general_accuracy = general_scores(base.model, base.corpus, scale.retention_windows)
    out.base_behaviour = rows.accuracy(base.model.eval(), task, same)
    with runtime.seeded(seed):
        untrained = GPT(base.model.config).to(_device(base.model)).eval()
    out.initial_accuracy = (general_scores(untrained, base.corpus, scale.retention_windows)[1],
                            rows.accuracy(untrained, task, same))
    out.base_context = context_loss(base.model, task, novel)
    return out


def contexts(task: DecisionTask, topics: Sequence[str], count: int, gen: torch.Generator,
             part: str) -> list[str]:
    """``count`` contexts, each from a topic drawn uniformly from ``topics``."""
    picks = torch.randint(len(topics), (count,), generator=gen).tolist()
    return [task.contexts(topics[i], 1, gen, part)[0] for i in picks]


def context_loss(model: GPT, task: DecisionTask, context_list: list[str]) -> float:
    """Next-character loss on the context characters of rows (context understanding), leaving out
    each context's first character (nothing before it to predict it from)."""
    row_list = [task.row(c) for c in context_list]
    ids = task.encode(row_list, _device(model))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, c in enumerate(context_list):
        mask[i, task.context_chars - len(c) + 1:task.context_chars] = True
    with torch.no_grad():
        return rows.masked_next_token_loss(model.logits(ids[:, :-1]), ids, mask).item()


# ----- one recipe, one run ---------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How to fine-tune: one named option per defence of the note, plus the two baselines.

    * parameter scale, ``optimizer``: "adamw" | "apollo" (channel-wise, rank n_embd/4) |
      "apollo_mini" (tensor-wise, rank 1);
    * gradient scale, ``gradient``: "all_tokens" | "decision_tokens" | "context_frozen";
    * data scale, ``data``: "narrow" (one topic) | "diverse" (every fine-tuning topic);
    * temporal scale, ``lr`` and ``batch_size``;
    * architectural scale, ``memory``: "weights" | "two_stage" (experiences served from the context
      window as a demonstration, moved into the weights by replay interleaved with general text);
    * generative scale, ``dreams`` (and ``dream_judge``: False accepts every dreamed answer);
    * baselines: ``ewc`` (strength lambda, 0 = off) and ``replay`` (share of general-text rows).
    """

    optimizer: str = "adamw"
    gradient: str = "all_tokens"
    data: str = "narrow"
    lr: float = 1e-3
    batch_size: int = 16
    memory: str = "weights"
    dreams: bool = False
    dream_judge: bool = True
    ewc: float = 0.0
    replay: float = 0.0

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("gradient", self.gradient, rows.GRADIENT_MODES)
        check_choice("data", self.data, DATA)
        check_choice("memory", self.memory, MEMORIES)
        check_range("lr", self.lr, 0, low_open=True)
        check_positive_ints(batch_size=self.batch_size)
        check_range("ewc", self.ewc, 0)
        check_range("replay", self.replay, 0, 1, high_open=True)

    @property
    def replay_share(self) -> float:
        return 0.5 if self.memory == "two_stage" and self.replay == 0 else self.replay


PLAIN = Recipe()
DEFENCES = {  # the six scales of the note, each as the fields that switch it on
    "apollo": {"optimizer": "apollo"},
    "context_frozen": {"gradient": "context_frozen"},
    "diverse": {"data": "diverse"},
    "small_steps": {"lr": 1e-4},
    "two_stage": {"memory": "two_stage"},
    "dreams": {"dreams": True},
}


def with_defences(names: Sequence[str], base: Recipe = PLAIN) -> Recipe:
    """``base`` with the named defences switched on."""
    for name in names:
        check_choice("defence", name, list(DEFENCES))
    return replace(base, **{k: v for name in names for k, v in DEFENCES[name].items()})


@dataclass
class Run:
    """What one fine-tuning run measured."""

    recipe: Recipe
    seed: int
    acquisition: float  # judge accuracy, held-out contexts of the fine-tuning topics
    novel: float  # judge accuracy, contexts of held-out topics
    general_loss: float
    general_accuracy: float  # top-1 next-character accuracy on held-out text
    retention: float  # exp(-(general loss - pretrained general loss))
    context_change: float  # context-character loss minus the pretrained one (nats)
    drift: dict[str, float]
    curve: list[dict] = field(default_factory=list)
    dreams_written: int = 0
    dreams_kept: int = 0
    dreams_right: int = 0  # kept dreams whose answer the judge accepts (all of them when it filtered)
    concentration: float = math.nan  # share of the update's squared norm in its largest 1% of entries
    seconds: float = 0.0
    memories: list[str] = field(default_factory=list, repr=False)  # the real experiences
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the fine-tuned weights

    @property
    def log_retention(self) -> float:
        return math.log(self.retention)

    def steps_to_acquire(self) -> float:
        """First evaluated step at which the judge accuracy reached :data:`ACQUIRED` (inf if never)."""
        return next((p["step"] for p in self.curve if p["acquisition"] >= ACQUIRED), math.inf)


def finetune(s: Setting, recipe: Recipe, seed: int) -> Run:
    """Fine-tune a copy of the pretrained model with ``recipe`` for ``s.scale.steps`` steps."""
    start = time.perf_counter()
    gen = runtime.generator(seed)
    model = _copy(s.base.model).train()
    anchor = plasticity.parameter_snapshot(model)
    memories = _experiences(s, recipe, gen)
    opt = make_optimizer(model, recipe, seed)
    penalty = _ewc(s, model, recipe)
    dreamed: list[tuple[str, str]] = []
    counts, curve = [0, 0, 0], []  # dreams written, kept, kept and right
    for step in range(1, s.scale.steps + 1):
        if recipe.dreams and step % s.scale.dream_every == 0:
            _dream_cycle(model, s, recipe, memories, dreamed, counts, gen)
        loss = _step_loss(model, s, recipe, memories, dreamed, gen)
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % s.scale.eval_every == 0:
            curve.append(_checkpoint(model, s, recipe, memories, step))
    return _measure(model, s, recipe, seed, anchor, memories, curve, counts, start)


def _copy(model: GPT) -> GPT:
    clone = GPT(model.config).to(_device(model))
    clone.load_state_dict(model.state_dict())
    return clone


def make_optimizer(model: GPT, recipe: Recipe, seed: int) -> torch.optim.Optimizer:
    """AdamW, or APOLLO on the blocks' matrices with AdamW on embeddings and vectors (as the paper)."""
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    embeddings = [model.wte.weight, model.wpe.weight]
    rest = [p for p in model.parameters() if all(p is not e for e in embeddings)]
    mini = recipe.optimizer == "apollo_mini"
    rank = 1 if mini else max(model.config.n_embd // 4, 1)
    return APOLLO([{"params": rest}, {"params": embeddings, "apollo": False}], lr=recipe.lr, rank=rank,
                  scale_type="tensor" if mini else "channel", seed=seed)


def _experiences(s: Setting, recipe: Recipe, gen: torch.Generator) -> list[str]:
    """The real experiences: ``s.scale.experiences`` contexts of one topic (narrow) or of all."""
    topics = s.task.train_topics
    if recipe.data == "narrow":
        topics = [topics[int(torch.randint(len(topics), (1,), generator=gen))]]
    return contexts(s.task, topics, s.scale.experiences, gen, "train")


def _ewc(s: Setting, model: GPT, recipe: Recipe) -> plasticity.EWCPenalty | None:
    if recipe.ewc == 0:
        return None
    if not s.fisher:
        s.fisher = fisher_on_general_text(model, s.base.corpus, s.scale.retention_windows)
    return plasticity.EWCPenalty(model, s.fisher, recipe.ewc)


def fisher_on_general_text(model: GPT, corpus: CharCorpus, windows: int) -> dict:
    """The diagonal empirical Fisher of the pretraining loss at the pretrained weights."""
    x, y = corpus.sequences("train", windows, model.config.block_size, runtime.generator(777))
    dev = _device(model)
    model.eval()
    fisher = plasticity.diagonal_fisher(model, _lm_loss, [(x.to(dev), y.to(dev))])
    model.train()
    return fisher


def _lm_loss(net, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x)[0].flatten(0, 1), y.flatten())


def _batch_rows(s: Setting, recipe: Recipe, memories: list[str], dreamed: list[tuple[str, str]],
                count: int, gen: torch.Generator) -> list[str]:
    """``count`` task rows: real experiences, half of them replaced by dreams once there are any."""
    n_dream = count // 2 if dreamed else 0
    real = torch.randint(len(memories), (count - n_dream,), generator=gen).tolist()
    picked = [s.task.row(memories[i]) for i in real]
    if n_dream:
        picked += [s.task.row(*dreamed[i]) for i in torch.randint(len(dreamed), (n_dream,), generator=gen).tolist()]
    return picked


def _step_loss(model: GPT, s: Setting, recipe: Recipe, memories: list[str], dreamed: list[tuple[str, str]],
               gen: torch.Generator) -> torch.Tensor:
    """The task loss of one batch, mixed with general text when the recipe replays it."""
    n_general = round(recipe.batch_size * recipe.replay_share)
    n_task = max(recipe.batch_size - n_general, 1)
    row_list = _batch_rows(s, recipe, memories, dreamed, n_task, gen)
    ids = s.task.encode(row_list, _device(model))
    mask, start = s.task.decision_mask(row_list, ids.device), s.task.decision_start
    if recipe.memory == "two_stage":  # each experience seen after another one in the context window
        demos = _batch_rows(s, recipe, memories, [], n_task, gen)
        ids = torch.cat([s.task.encode(demos, ids.device), ids], dim=1)
        mask = torch.cat([torch.zeros_like(mask), mask], dim=1)
        start += s.task.row_length
    loss = rows.decision_loss(model, ids, mask, recipe.gradient, start)
    if n_general == 0:
        return loss
    x, y = s.base.corpus.sequences("train", n_general, s.task.row_length, gen)
    general = _lm_loss(model, (x.to(ids.device), y.to(ids.device)))
    return (n_task * loss + n_general * general) / (n_task + n_general)


def _dream_cycle(model: GPT, s: Setting, recipe: Recipe, memories: list[str],
                 dreamed: list[tuple[str, str]], counts: list[int], gen: torch.Generator) -> None:
    model.eval()
    kept, decided, written = rows.dream(model, s.task, memories, s.scale.dream_count, gen,
                                        use_judge=recipe.dream_judge)
    model.train()
    dreamed.extend(zip(kept, decided, strict=True))
    del dreamed[:-4 * s.scale.experiences]  # a bounded dream store, newest kept
    counts[0] += written
    counts[1] += len(kept)
    counts[2] += int(s.task.judge(kept, decided).sum()) if kept else 0


def _demos(s: Setting, recipe: Recipe, memories: list[str], count: int) -> list[str] | None:
    """Two-stage memory serves each query with the newest experience in the context window."""
    return [s.task.row(memories[-1])] * count if recipe.memory == "two_stage" else None


def _checkpoint(model: GPT, s: Setting, recipe: Recipe, memories: list[str], step: int) -> dict:
    model.eval()
    half = s.scale.eval_examples // 2
    same, novel = s.same_topic[:half], s.novel[:half]
    point = {"step": step,
             "acquisition": rows.accuracy(model, s.task, same, _demos(s, recipe, memories, len(same))),
             "novel": rows.accuracy(model, s.task, novel, _demos(s, recipe, memories, len(novel))),
             "general_loss": general_loss(model, s.base.corpus, s.scale.retention_windows)}
    model.train()
    return point


def _measure(model: GPT, s: Setting, recipe: Recipe, seed: int, anchor: dict, memories: list[str],
             curve: list[dict], counts: list[int], start: float) -> Run:
    model.eval()
    loss, general_accuracy = general_scores(model, s.base.corpus, s.scale.retention_windows)
    demos = _demos(s, recipe, memories, len(s.novel))
    return Run(recipe, seed,
               acquisition=rows.accuracy(model, s.task, s.same_topic, demos),
               novel=rows.accuracy(model, s.task, s.novel, demos),
               general_loss=loss, general_accuracy=general_accuracy, retention=math.exp(-(loss - s.base_general)),
               context_change=context_loss(model, s.task, s.novel) - s.base_context,
               drift=plasticity.weight_drift(model, anchor), curve=curve,
               dreams_written=counts[0], dreams_kept=counts[1], dreams_right=counts[2],
               concentration=plasticity.update_concentration(_update(model, anchor)),
               seconds=time.perf_counter() - start, memories=memories,
               weights=plasticity.parameter_snapshot(model))


def model_of(s: Setting, run: Run) -> GPT:
    """The fine-tuned model of ``run``."""
    model = _copy(s.base.model)
    model.load_state_dict(run.weights, strict=False)
    return model.eval()


def _update(model: GPT, anchor: dict) -> dict:
    return {name: p.detach() - anchor[name] for name, p in model.named_parameters()}


def sharpness(s: Setting, run: Run, iterations: int = 10, count: int = 64) -> float:
    """Top Hessian eigenvalue of the decision-token loss at the fine-tuned weights of ``run``
    (power iteration on Hessian-vector products), on the same ``count`` held-out rows for every
    run, so that every run's sharpness is that of one and the same loss."""
    model = model_of(s, run)
    row_list = [s.task.row(c) for c in s.same_topic[:count]]
    ids = s.task.encode(row_list, _device(model))
    mask = s.task.decision_mask(row_list, ids.device)

    def loss_fn(net, batch):
        i, m = batch
        return rows.masked_next_token_loss(net(i[:, :-1])[0], i, m)

    return plasticity.top_hessian_eigenvalue(model, loss_fn, (ids, mask), iterations, runtime.generator(0))


def barrier(s: Setting, run: Run) -> float:
    """Barrier of the general-text loss on the straight path from the pretrained weights to the
    fine-tuned ones (Frankle et al. 2020): 0 when the path stays inside one basin."""
    model = _copy(s.base.model).eval()
    x, y = s.base.corpus.sequences("val", s.scale.retention_windows, model.config.block_size,
                                   runtime.generator(12345))
    dev = _device(model)
    start = plasticity.parameter_snapshot(model)
    return plasticity.loss_barrier(model, start, run.weights, _lm_loss, (x.to(dev), y.to(dev)), points=7)[1]


# ----- many runs -------------------------------------------------------------------------------

def run_all(s: Setting, recipes: dict[str, Recipe], seeds: Sequence[int], desc: str = "fine-tuning",
            workers: int = 1) -> pd.DataFrame:
    """Every named recipe for every seed, one row per run (the :class:`Run` kept in column "run").

    Each run computes on one thread; ``workers`` > 1 maps the runs over that many processes. The
    numbers are the same either way."""
    check_positive_ints(workers=workers)
    jobs = list(itertools.product(dict.fromkeys(recipes.values()), seeds))  # a recipe named twice runs once
    if workers == 1:
        with runtime.threads(1):
            runs = [finetune(s, recipe, seed) for recipe, seed in runtime.progress(jobs, desc=desc)]
    else:
        runs = _in_processes(s, jobs, workers, desc)
    done = dict(zip(jobs, runs, strict=True))
    return pd.DataFrame([_row(name, done[recipe, seed]) for name, recipe in recipes.items() for seed in seeds])


def _row(name: str, run: Run) -> dict:
    return {"name": name, "seed": run.seed, "acquisition": run.acquisition, "novel": run.novel,
            "retention": run.retention, "log_retention": run.log_retention, "forgetting": -run.log_retention,
            "context_change": run.context_change, "drift": run.drift["all"],
            "steps_to_acquire": run.steps_to_acquire(), "concentration": run.concentration,
            "seconds": run.seconds, "run": run}


_WORKER_SETTING: Setting | None = None


def _in_processes(s: Setting, jobs: list, workers: int, desc: str) -> list[Run]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(s,)) as pool:
        futures = [pool.submit(_work, recipe, seed) for recipe, seed in jobs]
        for _ in runtime.progress(as_completed(futures), total=len(futures), desc=desc):
            pass
        return [f.result() for f in futures]


def _start_worker(s: Setting) -> None:
    global _WORKER_SETTING
    torch.set_num_threads(1)
    _WORKER_SETTING = s


def _work(recipe: Recipe, seed: int) -> Run:
    return finetune(_WORKER_SETTING, recipe, seed)


def per_seed(frame: pd.DataFrame, name: str, column: str) -> list[float]:
    """One value per seed of recipe ``name``."""
    return frame[frame["name"] == name].sort_values("seed")[column].tolist()


def paired_difference(frame: pd.DataFrame, a: str, b: str, column: str) -> list[float]:
    """``a - b`` per seed."""
    return list(np.subtract(per_seed(frame, a, column), per_seed(frame, b, column)))


# ----- the chapter's run sets ------------------------------------------------------------------

FACTORS = ("apollo", "context_frozen", "diverse", "dreams")
MULTI_SCALE = ("apollo", "context_frozen", "diverse", "two_stage", "dreams")  # all but small steps


def factorial_recipes(factors: Sequence[str] = FACTORS, base: Recipe = PLAIN) -> dict[str, Recipe]:
    """Every on/off combination of ``factors`` (2^k cells), named by the defences switched on."""
    cells = {}
    for on in itertools.product((False, True), repeat=len(factors)):
        names = [f for f, o in zip(factors, on, strict=True) if o]
        cells["+".join(names) or "plain"] = with_defences(names, base)
    return cells


def comparison_recipes(base: Recipe, small_lr: float) -> dict[str, Recipe]:
    """The single techniques outside the factorial, the baselines, the multi-scale set and its
    leave-one-out variants, all at ``base``'s (aggressive) learning rate unless named otherwise."""
    recipes = {"small_steps": replace(base, lr=small_lr),
               "single_examples": replace(base, lr=small_lr, batch_size=1),
               "apollo_mini": replace(base, optimizer="apollo_mini"),
               "decision_tokens": replace(base, gradient="decision_tokens"),
               "two_stage": with_defences(["two_stage"], base), "ewc": replace(base, ewc=100.0),
               "replay": replace(base, replay=0.5), "multi_scale": with_defences(MULTI_SCALE, base),
               "dreams_unjudged": replace(with_defences(["dreams"], base), dream_judge=False)}
    for left_out in MULTI_SCALE:
        recipes[f"without_{left_out}"] = with_defences([d for d in MULTI_SCALE if d != left_out], base)
    return recipes


def lr_sweep_recipes(base: Recipe, lrs: Sequence[float]) -> dict[str, Recipe]:
    """Plain and multi-scale fine-tuning at each learning rate."""
    out = {}
    for lr in lrs:
        out[f"plain@{lr:g}"] = replace(base, lr=lr)
        out[f"multi_scale@{lr:g}"] = replace(with_defences(MULTI_SCALE, base), lr=lr)
    return out


def chapter_recipes(base: Recipe, small_lr: float, lrs: Sequence[float]) -> dict[str, Recipe]:
    """Every recipe the chapter runs, by name (a recipe may have several names; it runs once)."""
    return {**factorial_recipes(FACTORS, base), **comparison_recipes(base, small_lr), **lr_sweep_recipes(base, lrs)}


# ----- the factorial, fitted -------------------------------------------------------------------

def design(frame: pd.DataFrame, factors: Sequence[str] = FACTORS) -> pd.DataFrame:
    """0/1 columns for each factor and each pairwise product, from the cell names."""
    on = {f: frame["name"].map(lambda n, f=f: float(f in n.split("+"))) for f in factors}
    columns = dict(on)
    for a, b in itertools.combinations(factors, 2):
        columns[f"{a} x {b}"] = on[a] * on[b]
    return pd.DataFrame(columns, index=frame.index)


def fit_effects(frame: pd.DataFrame, outcome: str, factors: Sequence[str] = FACTORS,
                tests: int = 1) -> pd.DataFrame:
    """Least squares of ``outcome`` on main effects and pairwise interactions, with 95% intervals
    from the residual variance (normal approximation; no interval when the fit has no residual
    degrees of freedom), Bonferroni-widened when ``tests`` intervals are judged together."""
    check_positive_ints(tests=tests)
    z = NormalDist().inv_cdf(1 - 0.025 / tests)
    x = design(frame, factors)
    x.insert(0, "intercept", 1.0)
    a, y = x.to_numpy(), frame[outcome].to_numpy(float)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    dof = len(y) - a.shape[1]
    sigma2 = float(np.sum((y - a @ coef) ** 2) / dof) if dof > 0 else math.nan
    se = np.sqrt(np.diag(np.linalg.pinv(a.T @ a)) * sigma2)
    return pd.DataFrame({"effect": coef, "low": coef - z * se, "high": coef + z * se}, index=x.columns)


def r_squared(frame: pd.DataFrame, outcome: str, factors: Sequence[str] = FACTORS,
              interactions: bool = False) -> float:
    """Share of the outcome's variance that main effects (and interactions) explain."""
    x = design(frame, factors)
    if not interactions:
        x = x[list(factors)]
    a = np.column_stack([np.ones(len(x)), x.to_numpy()])
    y = frame[outcome].to_numpy(float)
    residual = y - a @ np.linalg.lstsq(a, y, rcond=None)[0]
    return float(1 - residual.var() / y.var()) if y.var() > 0 else math.nan


def interaction_share(effects: pd.DataFrame) -> float:
    """Share of the pairwise interactions whose 95% interval excludes zero."""
    pairs = effects[effects.index.str.contains(" x ")]
    return float(((pairs["low"] > 0) | (pairs["high"] < 0)).mean())


# ----- mechanism measurements ------------------------------------------------------------------

def gradient_by_module(s: Setting, seed: int, count: int = 16) -> pd.DataFrame:
    """Gradient norm of each weight group at the pretrained weights, for each gradient mode, on the
    same batch of rows; and the gradient reaching the context's embedded inputs."""
    gen = runtime.generator(seed)
    row_list = [s.task.row(c) for c in contexts(s.task, s.task.train_topics, count, gen, "train")]
    out = []
    for mode in rows.GRADIENT_MODES:
        model = _copy(s.base.model)
        ids = s.task.encode(row_list, _device(model))
        model.zero_grad()
        rows.decision_loss(model, ids, s.task.decision_mask(row_list, ids.device), mode,
                           s.task.decision_start).backward()
        out += [{"mode": mode, "group": g, "norm": n} for g, n in plasticity.gradient_norms(model).items()]
    return pd.DataFrame(out)


def gradient_spread(s: Setting, seed: int, count: int = 16) -> dict[str, float]:
    """Mean cosine between successive per-example gradients of the decision loss, at the pretrained
    weights, for a stream of narrow (one topic) and of diverse examples."""
    gen = runtime.generator(seed)
    topic = s.task.train_topics[int(torch.randint(len(s.task.train_topics), (1,), generator=gen))]
    streams = {"narrow": contexts(s.task, [topic], count, gen, "train"),
               "diverse": contexts(s.task, s.task.train_topics, count, gen, "train")}
    return {name: plasticity.gradient_overlap([_example_gradient(s, c) for c in stream])
            for name, stream in streams.items()}


def _example_gradient(s: Setting, context: str) -> dict[str, torch.Tensor]:
    model = _copy(s.base.model)
    row_list = [s.task.row(context)]
    ids = s.task.encode(row_list, _device(model))
    rows.decision_loss(model, ids, s.task.decision_mask(row_list, ids.device), "decision_tokens",
                       s.task.decision_start).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def in_context_accuracy(s: Setting, seed: int) -> dict[str, float]:
    """The fast stage alone: the pretrained model's accuracy without and with one demonstration."""
    gen = runtime.generator(seed)
    demo = contexts(s.task, s.task.train_topics, 1, gen, "train")[0]
    model = s.base.model.eval()
    return {"without demonstration": rows.accuracy(model, s.task, s.same_topic),
            "with one demonstration": rows.accuracy(model, s.task, s.same_topic,
                                                    [s.task.row(demo)] * len(s.same_topic))}


# ----- injected faults -------------------------------------------------------------------------

def bad_batch_damage(s: Setting, lrs: Sequence[float], seed: int) -> dict[float, float]:
    """Fault: one AdamW step on a batch of random characters (loss on all tokens) from the pretrained
    weights. Damage: the increase of the general-text loss, per learning rate."""
    for lr in lrs:
        check_range("lr", lr, 0, low_open=True)
    gen = runtime.generator(seed)
    ids = torch.randint(len(s.task.vocabulary), (16, s.task.row_length), generator=gen)
    damage = {}
    for lr in lrs:
        model = _copy(s.base.model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        x = ids.to(_device(model))
        F.cross_entropy(model.logits(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        damage[lr] = general_loss(model.eval(), s.base.corpus, s.scale.retention_windows) - s.base_general
    return damage


def overfit_then_diverse(s: Setting, run: Run, lr: float, overfit_steps: int = 20,
                         diverse_steps: int = 1) -> dict[str, float]:
    """Fault: starting from the fine-tuned weights of ``run``, ``overfit_steps`` AdamW steps on a
    batch that repeats one single experience; then ``diverse_steps`` steps on diverse batches, with
    a fresh optimizer (the fault's momentum would otherwise carry on in the diverse step).
    The judge's accuracy on novel contexts before, after the fault, and after the diverse steps."""
    check_range("lr", lr, 0, low_open=True)
    check_positive_ints(overfit_steps=overfit_steps, diverse_steps=diverse_steps)
    gen = runtime.generator(10_000 + run.seed)
    model = model_of(s, run).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    one = contexts(s.task, s.task.train_topics, 1, gen, "train") * 16
    diverse = contexts(s.task, s.task.train_topics, 16 * diverse_steps, gen, "train")
    out = {"before": rows.accuracy(model.eval(), s.task, s.novel)}
    for label, steps, chunk in (("after the fault", overfit_steps, one), ("after diverse", diverse_steps, diverse)):
        model.train()
        for i in range(steps):
            _train_step(model, opt, s, chunk[16 * i % len(chunk):][:16])
        out[label] = rows.accuracy(model.eval(), s.task, s.novel)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # no momentum of the fault
    return out


def _train_step(model: GPT, opt: torch.optim.Optimizer, s: Setting, context_list: list[str]) -> None:
    row_list = [s.task.row(c) for c in context_list]
    ids = s.task.encode(row_list, _device(model))
    opt.zero_grad(set_to_none=True)
    rows.decision_loss(model, ids, s.task.decision_mask(row_list, ids.device), "decision_tokens",
                       s.task.decision_start).backward()
    opt.step()


def novel_decision_loss(model: GPT, s: Setting) -> float:
    """Loss on the decision tokens of the held-out topics' contexts."""
    row_list = [s.task.row(c) for c in s.novel]
    ids = s.task.encode(row_list, _device(model))
    with torch.no_grad():
        return rows.masked_next_token_loss(model.logits(ids[:, :-1]), ids,
                                           s.task.decision_mask(row_list, ids.device)).item()


# ----- summaries for the ledger ----------------------------------------------------------------

def curvature(s: Setting, frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Sharpness of the fine-tuned weights of each named recipe, one row per seed."""
    runs = frame[frame["name"].isin(names)]
    return pd.DataFrame({"name": runs["name"], "seed": runs["seed"],
                         "sharpness": [sharpness(s, r) for r in runtime.progress(runs["run"], desc="sharpness")]})


def basin_barriers(s: Setting, frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """General-text loss barrier between the pretrained and each named recipe's weights."""
    runs = frame[frame["name"].isin(names)]
    return pd.DataFrame({"name": runs["name"], "seed": runs["seed"],
                         "barrier": [barrier(s, r) for r in runtime.progress(runs["run"], desc="barriers")]})


def ratio(table: pd.DataFrame, a: str, b: str, column: str) -> list[float]:
    """``a / b`` per seed."""
    return list(np.divide(per_seed(table, a, column), per_seed(table, b, column)))


def highest_safe_lr(frame: pd.DataFrame, prefix: str, lrs: Sequence[float], tolerance: float = TOLERANCE) -> float:
    """The largest learning rate whose mean forgetting (nats) stays within ``tolerance``; 0 if none."""
    safe = [lr for lr in lrs if np.mean(per_seed(frame, f"{prefix}@{lr:g}", "forgetting")) <= tolerance]
    return max(safe, default=0.0)


def score(frame: pd.DataFrame, name: str) -> list[float]:
    """Behaviour kept times capability kept: novel-situation accuracy x retention, per seed."""
    return list(np.multiply(per_seed(frame, name, "novel"), per_seed(frame, name, "retention")))


def leave_one_out(frame: pd.DataFrame) -> pd.DataFrame:
    """How much removing each defence from the multi-scale set lowers :func:`score` (per seed)."""
    full = score(frame, "multi_scale")
    return pd.DataFrame([{"left out": d, "seed": seed, "drop": f - w}
                         for d in MULTI_SCALE
                         for seed, f, w in zip(sorted(set(frame["seed"])), full, score(frame, f"without_{d}"),
                                               strict=True)])


def keystone(loo: pd.DataFrame) -> str:
    """The defence whose removal lowers the score most, on the mean over seeds."""
    return str(loo.groupby("left out")["drop"].mean().idxmax())


def drift_ratios(frame: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per weight group and seed: relative weight change of recipe ``a`` over that of ``b``."""
    out = []
    for run_a, run_b in zip(per_seed(frame, a, "run"), per_seed(frame, b, "run"), strict=True):
        out += [{"group": g, "seed": run_a.seed, "ratio": run_a.drift[g] / run_b.drift[g]}
                for g in run_a.drift if g != "all"]
    return pd.DataFrame(out)


def both(first: Sequence[bool], second: Sequence[bool]) -> list[float]:
    """1.0 where both per-seed conditions hold, else 0.0."""
    return [float(a and b) for a, b in zip(first, second, strict=True)]


def acquired(frame: pd.DataFrame, name: str) -> bool:
    """Whether recipe ``name`` reached :data:`ACQUIRED` on the mean over seeds."""
    return float(np.mean(per_seed(frame, name, "acquisition"))) >= ACQUIRED


def summary_table(frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Mean and spread (min-max over seeds) of the outcomes of each named recipe."""
    table = frame[frame["name"].isin(names)].groupby("name", sort=False)
    columns = ["acquisition", "novel", "forgetting", "context_change", "drift", "steps_to_acquire"]
    return table[columns].agg(["mean", "min", "max"]).reindex(names)


def constant_baseline(s: Setting, novel: bool = False) -> float:
    """Judge accuracy of the best constant answer on the held-out contexts of the fine-tuning topics
    (or on the novel ones): a model that learned nothing about the context can reach it."""
    decisions = [s.task.decide(c) for c in (s.novel if novel else s.same_topic)]
    return max(decisions.count(d) for d in set(decisions)) / len(decisions)


def learned(frame: pd.DataFrame, name: str, s: Setting, margin: float = 0.1) -> bool:
    """Whether recipe ``name`` changed the responses: mean judge accuracy at least ``margin`` above
    the best constant answer's."""
    return float(np.mean(per_seed(frame, name, "acquisition"))) >= constant_baseline(s) + margin


def wrong_dream_share(frame: pd.DataFrame, name: str) -> list[float]:
    """Per seed, the share of kept dreams whose answer is wrong."""
    runs = per_seed(frame, name, "run")
    return [1 - r.dreams_right / r.dreams_kept if r.dreams_kept else 0.0 for r in runs]


def curves(frame: pd.DataFrame, name: str, s: Setting) -> pd.DataFrame:
    """Judge accuracy and retention at each checkpoint of recipe ``name``, one row per seed."""
    return pd.DataFrame([{"name": name, "seed": run.seed, "step": p["step"], "accuracy": p["acquisition"],
                          "retention": math.exp(-(p["general_loss"] - s.base_general))}
                         for run in per_seed(frame, name, "run") for p in run.curve])


def slider_grid(frame: pd.DataFrame, s: Setting, lrs: Sequence[float]) -> dict:
    """For the static slider: per learning rate, the mean accuracy and retention curves of plain and
    multi-scale fine-tuning."""
    grid = {}
    for lr in lrs:
        grid[f"lr {lr:g}"] = {}
        for label, prefix in (("plain", "plain"), ("multi-scale", "multi_scale")):
            mean = curves(frame, f"{prefix}@{lr:g}", s).groupby("step")[["accuracy", "retention"]].mean()
            grid[f"lr {lr:g}"][f"{label}: accuracy"] = (mean.index.tolist(), mean["accuracy"].tolist())
            grid[f"lr {lr:g}"][f"{label}: retention"] = (mean.index.tolist(), mean["retention"].tolist())
    return grid


def safe_lr_count(frame: pd.DataFrame, prefix: str, lrs: Sequence[float], tolerance: float = TOLERANCE) -> int:
    """How many learning rates of the sweep keep the mean forgetting within ``tolerance``."""
    return int(sum(np.mean(per_seed(frame, f"{prefix}@{lr:g}", "forgetting")) <= tolerance for lr in lrs))


def live_figure(s: Setting, lr: float, defences: Sequence[str], seed: int):
    """One fine-tuning run with the chosen defences, drawn as accuracy and retention over steps."""
    import matplotlib.pyplot as plt

    run = finetune(s, replace(with_defences(defences), lr=lr), seed)
    steps = [p["step"] for p in run.curve]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(steps, [p["acquisition"] for p in run.curve], marker="o", label="judge accuracy")
    ax.plot(steps, [math.exp(-(p["general_loss"] - s.base_general)) for p in run.curve], marker="s",
            label="retention")
    ax.set(xlabel="fine-tuning step", ylabel="share", ylim=(0, 1.05),
           title=f"lr {lr:g}, defences: {', '.join(defences) or 'none'}")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def gem_table(frame: pd.DataFrame, s: Setting, names: Sequence[str]) -> pd.DataFrame:
    """GEM scores (Lopez-Paz & Ranzato 2017) of two tasks in sequence -- general text (next-character
    accuracy), then the behaviour (judge accuracy) -- per recipe, mean over seeds. R[0] is the
    pretrained model, R[1] the fine-tuned one, b an untrained model."""
    out = []
    for name in names:
        for run in per_seed(frame, name, "run"):
            accuracy = torch.tensor([[s.base_general_accuracy, s.base_behaviour],
                                     [run.general_accuracy, run.acquisition]])
            out.append({"name": name, **plasticity.gem_metrics(accuracy, torch.tensor(s.initial_accuracy))})
    return pd.DataFrame(out).groupby("name", sort=False).mean().reindex(names)


def drift_by_module(frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Relative weight change of each module, per recipe and seed."""
    return pd.DataFrame([{"name": name, "seed": run.seed, "module": group, "drift": value}
                         for name in names for run in per_seed(frame, name, "run")
                         for group, value in run.drift.items() if group != "all"])
