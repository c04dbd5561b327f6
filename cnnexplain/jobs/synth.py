"""``data synth``: write the synthetic world to disk as a Broden directory, an ImageFolder
train/val tree, or TCAV concept folders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cnnexplain.config.data import SynthOptions
from cnnexplain.jobs.base import Output, Session

COMMAND = "data synth"
RECORD = False
"""The export directory is a dataset: no run.json is written into it."""


@dataclass
class Plan:
    options: SynthOptions
    world: object
    extra: dict


def plan(options: SynthOptions, session: Session) -> Plan:
    """The world's configuration (spec, then ``num_images`` / ``resolution`` / ``seed``)."""
    from cnnexplain.data.synthetic import WorldConfig

    o = options
    world = WorldConfig.from_spec(o.world)
    changes = {k: v for k, v in (("seed", o.seed or None), ("num_images", o.num_images),
                                 ("resolution", o.resolution)) if v is not None}
    world = dataclasses.replace(world, **changes) if changes else world
    extra = {}
    if o.fmt == "concepts":
        extra = {"concepts": o.concept_names(), "n_per_concept": o.per_concept,
                 "n_random_sets": o.random_sets, "min_coverage": o.min_coverage,
                 "balance_classes": o.balance_classes, "scope": o.concept_scope}
    return Plan(o, world, extra)


def run(plan: Plan, session: Session):
    """Render and write the export (staged: a killed export leaves nothing that looks
    complete); returns the export's counts."""
    from cnnexplain.data.export import EXPORT_FORMATS

    state = {"cm": None, "task": None, "done": 0}

    def progress(done: int, total: int) -> None:  # the exporters' (done, total) callbacks
        if state["task"] is None:
            state["cm"] = session.progress(total=total, description=f"export {plan.options.fmt}")
            state["task"] = state["cm"].__enter__()
        state["task"].advance(done - state["done"])
        state["done"] = done
        if done >= total:
            state["cm"].__exit__(None, None, None)

    return EXPORT_FORMATS[plan.options.fmt](plan.world, session.out, progress=progress,
                                            overwrite=plan.options.overwrite, **plan.extra)


def write(plan: Plan, counts, session: Session) -> Output:
    summary = {"format": plan.options.fmt, "world": plan.world.to_spec(), "path": str(session.out)}
    if isinstance(counts, dict):
        summary["counts"] = counts
    return Output(summary=summary, result=counts)
