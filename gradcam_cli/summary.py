"""The end of a run: summary.csv merged from every process's rows, the closing lines, and the
report; or, for a run that stopped early, what is done and the command that resumes it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from . import faults, outputs, report
from .errors import program
from .explainer import ClassPlan
from .settings import RunPlan


@dataclass
class RunResult:
    """Counts of one process (or, after ``finish``, of all) and its summary rows.

    ``skipped`` names each image that was not processed (its path relative to --images_path)
    and why: not a readable image, or the model failed on it. ``stop`` is what ended the run
    early (a fault, SIGTERM, Ctrl-C), or None."""

    processed: int = 0
    unreadable: int = 0
    already_done: int = 0
    rows: list[list[str]] = field(default_factory=list)
    resumed: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stop: BaseException | None = None


def summary_header(plan: RunPlan) -> list[str]:
    """summary.csv's columns for this run's panels, layers and metrics."""
    return outputs.summary_header(ClassPlan(plan.options).ranks, plan.settings.tags,
                                  plan.options.metrics)


def wanted_rows(plan: RunPlan, rows: dict[int, list[str]],
                width: int | None = None) -> dict[int, list[str]]:
    """The rows that belong to this run's images (same index, same file), of full width."""
    wanted = {entry.index: entry.relative for entry in plan.entries}
    return {i: row for i, row in rows.items() if wanted.get(i) == row[1]
            and (width is None or len(row) == width)}


def run_report(plan: RunPlan) -> report.RunReport | None:
    """The run's report.html writer; None with --no_report."""
    if not plan.settings.report:
        return None
    classes = ClassPlan(plan.options)
    return report.RunReport(plan.settings.save_dir, summary_header(plan), plan.labels,
                            plan.settings.signature, len(plan.entries), classes.accuracy_top)


def finish(plan: RunPlan, result: RunResult, sanity=None) -> RunResult:
    """Merge every process's rows into summary.csv and report; returns the run's totals.

    A stopped run (``result.stop``) only writes what is done and says how to resume; it
    never waits on the other processes, which may be gone. ``sanity`` (a
    ``sanity_run.SanitySummary``) adds the sanity check's line and table."""
    if result.stop is None:
        try:
            gathered = plan.dist.gather(result)
        except (KeyboardInterrupt, faults.Terminated, faults.RunFault) as stop:
            result.stop = stop
    if result.stop is not None:
        return _finish_stopped(plan, result)
    faults.run_complete()  # every image is done: a stop signal from here on is dropped
    total = RunResult(processed=sum(r.processed for r in gathered),
                      unreadable=sum(r.unreadable for r in gathered),
                      already_done=sum(r.already_done for r in gathered),
                      skipped=[item for r in gathered for item in r.skipped])
    if not plan.dist.leader:
        return total
    carried = outputs.previous_rows(plan.settings.save_dir) if result.resumed else {}
    rows = wanted_rows(plan, carried)
    for process in gathered:
        rows.update({int(row[0]): row for row in process.rows})
    total.rows = list(rows.values())
    return _write_summary_and_report(plan, total, sanity)


def _write_summary_and_report(plan: RunPlan, total: RunResult, sanity=None) -> RunResult:
    """The first process's summary.csv, report and closing lines for a run that is done."""
    settings, merged = plan.settings, total.rows
    classes = ClassPlan(plan.options)
    header = summary_header(plan)
    try:
        outputs.release_space(settings.save_dir)
        outputs.write_summary(settings.save_dir, header, merged)
    except OSError as error:
        total.stop = faults.RunFault(f"cannot write {settings.save_dir / outputs.SUMMARY}: "
                                     f"{error.strerror or error}")
        _say_stopped(plan, total.stop, total.processed + total.already_done, len(plan.entries),
                     "the rows are kept for --skip_existing")
        return total
    means = metric_means(plan, merged) if plan.options.metrics else None
    if means is not None:
        print_metric_means(means, plan, len(merged))
    print_accuracy(merged, plan, classes)
    if sanity is not None:
        print(sanity.line)
    if settings.report:
        run_report(plan).write(merged, total.skipped, sanity=sanity, means=means)
    done = f", {total.already_done} already done" if total.already_done else ""
    print(f"processed {total.processed} image(s), skipped {total.unreadable}{done}; "
          f"figures in {settings.save_dir}")
    return total


def _finish_stopped(plan: RunPlan, result: RunResult) -> RunResult:
    """summary.csv for the images done so far, and the one line that says how to resume.

    Under torchrun the first process writes it from every process's row log (which stay in
    place, as other processes may still be adding to them); the others only say why they
    stopped."""
    settings, dist = plan.settings, plan.dist
    header = summary_header(plan)
    done = result.processed + result.already_done
    written = "the rows are kept for --skip_existing"
    if dist.leader:
        if dist.active:
            rows = outputs.previous_rows(settings.save_dir, with_summary=result.resumed)
        else:
            rows = outputs.previous_rows(settings.save_dir) if result.resumed else {}
            rows.update({int(row[0]): row for row in result.rows})
        rows = wanted_rows(plan, rows, width=len(header))
        try:
            with faults.deferred():
                outputs.release_space(settings.save_dir)
                outputs.write_summary(settings.save_dir, header, list(rows.values()),
                                      keep_logs=dist.active)
            written = f"{len(rows)} in {settings.save_dir / outputs.SUMMARY}"
        except OSError as error:
            written = (f"summary.csv not written ({error.strerror or error}); "
                       f"the rows are kept for --skip_existing")
        else:
            stopped_report = run_report(plan)
            if stopped_report is not None:
                with faults.deferred():
                    stopped_report.write(list(rows.values()), result.skipped,
                                         stopped=faults.describe_stop(result.stop))
    _say_stopped(plan, result.stop, done, len(plan.share), written)
    return result


def _say_stopped(plan: RunPlan, stop: BaseException, done: int, share: int,
                 written: str) -> None:
    dist = plan.dist
    who = f"{program()} (rank {dist.rank} of {dist.world})" if dist.active else program()
    print(f"{who}: {faults.describe_stop(stop)}; {done} of {share} images done ({written}); "
          f"resume with: {plan.settings.resume_command}", file=sys.stderr, flush=True)


def print_accuracy(rows: list[list[str]], plan: RunPlan, classes: ClassPlan) -> None:
    """The run's accuracy, when every folder name is a label: top-1 and top-k; for a
    multi-label model, whether the folder's class is the most probable and whether it is
    among the classes shown (at or above the threshold); for a binary model, whether the
    class predicted at the threshold is the folder's."""
    if classes.accuracy_top is None:
        return
    binary = plan.options.threshold if classes.binary else None
    scores = outputs.accuracy(rows, plan.labels, classes.accuracy_top, binary)
    if scores is None:
        return
    where = f"accuracy over {len(rows)} images whose folder names are labels"
    if classes.binary:
        print(f"{where}: {scores[0]:.1%} (the class when its probability is at least "
              f"{plan.options.threshold:g}, else {plan.labels[0]})")
    elif classes.multi_label:
        print(f"{where}: most probable class {scores[0]:.1%}, folder class at or above "
              f"{plan.options.threshold:g} (or the most probable) {scores[1]:.1%}")
    else:
        print(f"{where}: top-1 {scores[0]:.1%}, top-{classes.top} {scores[1]:.1%}")


@dataclass(frozen=True)
class MetricMeans:
    """The run's mean faithfulness per figure tag and per baseline map, over the maps of
    ``ranks`` (the predicted class's, as the papers report them; every panel with
    --classes); the baselines over the first panel's maps."""

    ranks: list[str]
    by_tag: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, float]]


def metric_means(plan: RunPlan, rows: list[list[str]]) -> MetricMeans:
    classes = ClassPlan(plan.options)
    ranks = ["top1"] if classes.is_top else classes.ranks[:1] if classes.binary \
        else classes.ranks
    header = summary_header(plan)
    return MetricMeans(ranks, outputs.metric_means(rows, header, plan.settings.tags, ranks),
                       outputs.metric_means(rows, header, list(outputs.BASELINE_TAGS),
                                            classes.ranks[:1]))


BASELINE_NAMES = {"random": "random map", "gaussian": "centred Gaussian"}


def describe_means(values: dict[str, float]) -> str:
    """One line's numbers: deletion and insertion AUC, average drop, increase, ROAD."""
    return (f"deletion AUC {values['deletion']:.4f}, insertion AUC {values['insertion']:.4f}, "
            f"average drop {values['drop']:.1f}%, increase in confidence "
            f"{100 * values['increase']:.1f}%, ROAD {values['road']:.4f} (MoRF "
            f"{values['road_morf']:+.4f}, LeRF {values['road_lerf']:+.4f})")


def print_metric_means(means: MetricMeans, plan: RunPlan, n_images: int) -> None:
    """One line per figure, then one per baseline map, so a reader sees at once whether a
    method's maps beat maps that carry no information."""
    options = plan.options
    kind = "counterfactual " if options.counterfactual else ""
    print(f"faithfulness of {kind}{', '.join(options.methods)} over {n_images} image(s), "
          f"maps of {', '.join(means.ranks)} (lower is better for deletion AUC, average drop "
          f"and ROAD MoRF; higher for insertion AUC, increase, ROAD and ROAD LeRF):")
    width = max(len(name) for name in [*means.by_tag, *BASELINE_NAMES.values()])
    for tag, values in means.by_tag.items():
        print(f"  {tag:<{width}}  {describe_means(values)}")
    for tag, values in means.baselines.items():
        print(f"  {BASELINE_NAMES[tag]:<{width}}  {describe_means(values)}")
