"""`evaluate`: cluster and linear probes on the trained head's codes and on raw features (docs/hp.md §8).

Everything is read from the caches: the train and val feature stores and the run's checkpoint.
The work is split into stages with their own manifests, each resumable and skipped when done:

  codes-<run>          S(f) for every train and val crop, written once as stores (shared by both probes)
  probe-<kind>-<run>   per feature kind ("head" codes, "raw" backbone features): the cluster centroids
                       and the linear probe (checkpointed every epoch)
  evaluate-<run>       predictions on val, metrics (before/after CRF), metrics.json and pictures

`evaluate.protocol` picks how the head's probes are made. `kmeans` (above): fitted on the finished head's
training codes. `paper` (the reference's, §8): the ClusterLookup and linear probes trained online during `train`
on every batch's detached codes; `probe-head-<run>` copies them from the run's checkpoint into the same files,
and `codes-<run>` writes only the val codes. The raw-feature rows keep the kmeans probes under either protocol
(the reference evaluates no raw features).

The checkpoint evaluated is always the run's last one: it is never chosen on validation labels. The sub-stages are
declared in pipeline/orchestration/graph.py; its executor runs them (and the run's training first) in order. What they
compute is pipeline/evaluation/scoring.py.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.evaluation.codes import write_codes
from pipeline.evaluation.encoders import load_encoder
from pipeline.evaluation.online_probes import crf_enabled, protocol_of
from pipeline.evaluation.probes import linear_optimizer, probes_of
from pipeline.evaluation.scoring import (
    PREDICTIONS,
    cluster_outputs,
    export_online_probes,
    kind_label,
    overcluster_text,
    protocol_lines,
    ran_settings,
    result_rows,
    run_probes,
    save_predictions,
    write_pictures,
)
from pipeline.files import atomic_write_text
from pipeline.log import log
from pipeline.methods.registry import method_of
from pipeline.orchestration import paths
from pipeline.orchestration.graph import Build, Step, build
from pipeline.orchestration.paths import inside
from pipeline.orchestration.runner import StageContext, manifest_path
from pipeline.orchestration.stage import implement
from pipeline.reporting.report import relative_path
from pipeline.wording import plural


# ---------------------------------------------------------------- the stages (declared in
# pipeline/orchestration/graph.py)
def run(config: Config, workdir: Path, run: str | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate run `run` (trained first when needed); --force recomputes its codes, probes and evaluation and may
    retrain a run whose settings changed."""
    return build(config, workdir, "evaluate", run=run, force=force)


def check(config: Config) -> None:
    """A typo or an impossible protocol fails before any work."""
    probes_of(config)
    linear_optimizer(config)
    method, protocol = method_of(config), protocol_of(config)
    if protocol not in method.protocols:
        raise UserError(f"evaluate.protocol = {protocol} is not one of {method.label}'s evaluations "
                        f"({', '.join(method.protocols)}; {method.doc}): use --set evaluate.protocol="
                        f"{method.protocols[0]}")


def stores(job: Build, step: Step) -> tuple[FeatureStore, FeatureStore]:
    """(train store, val store) the run was trained on and is evaluated on (the val split may lack labels: then
    the clusters are reported, not scored)."""
    train = FeatureStore.open(job.upstream(step, "train")["outputs"]["store"])
    val_name = next(name for name in step.upstream if name.startswith("features-val"))
    return train, FeatureStore.open(job.done[val_name]["outputs"]["store"])


def checkpoint_of(job: Build, step: Step) -> str:
    """The run's (last) checkpoint as its train manifest names it: never outside the work folder."""
    where = manifest_path(job.sdir, f"train-{step.run}")
    return str(inside(job.upstream(step, "train")["outputs"]["checkpoint"], job.workdir, where))


def codes_of(job: Build, step: Step) -> dict[str, str]:
    """The codes stores {split: url} as the codes manifest names them: never outside the work folder."""
    where, outputs = manifest_path(job.sdir, f"codes-{step.run}"), job.upstream(step, "codes")["outputs"]
    return {split: str(inside(url, job.workdir, where)) for split, url in outputs.items()}


def codes_body(job: Build, step: Step, ctx: StageContext) -> dict[str, Any]:
    """S(f) of every crop of the splits the probes need, written once (protocol paper: the val crops only)."""
    by_split = dict(zip(("train", "val"), stores(job, step), strict=True))
    splits = {split: by_split[split] for split in step.config.get("splits", ["train", "val"])}
    encoder = load_encoder(checkpoint_of(job, step))
    rdir, urls = paths.run_dir(job.config, job.workdir, step.run), {}
    for split, source in splits.items():
        urls[split] = str(paths.codes_dir(rdir) / f"{split}.zarr")
        write_codes(encoder, source, urls[split], ctx.fresh, job.config["evaluate"]["batch_size"], ctx.fingerprint,
                    val_extras(job, step) if split == "val" else None)
    counts = " and ".join(plural(len(source), f"{split} crop") for split, source in splits.items())
    return {**urls, "summary": f"codes of {counts}"}


def val_extras(job: Build, step: Step) -> dict[str, tuple[FeatureStore, str]]:
    """What the method's val codes read besides the val store (Method.val_inputs): each such stage's outputs name
    its store and the arrays it provides ({"arrays": {encoder array: store array}}); a stage that wrote no store
    (an option skipped it) provides nothing."""
    extra = {}
    for name in method_of(job.config).val_inputs:
        outputs = job.upstream(step, name)["outputs"]
        if outputs.get("store"):
            store = FeatureStore.open(str(inside(outputs["store"], job.workdir, manifest_path(job.sdir, name))))
            extra.update({array: (store, held) for array, held in outputs.get("arrays", {}).items()})
    return extra


def codes_then(job: Build, step: Step, manifest: dict[str, Any]) -> None:
    codes_of(job, step)  # refused at once when a manifest points elsewhere


def probe_body(job: Build, step: Step, ctx: StageContext) -> dict[str, Any]:
    """One feature kind's probes: fitted on its training features (protocol kmeans), or, for the head under protocol
    paper (§8), the probes trained online taken from the run's checkpoint."""
    kind = step.stage.removeprefix("probe-")
    out = paths.probe_dir(paths.run_dir(job.config, job.workdir, step.run), kind)
    if kind == "head" and method_of(job.config).online_probes(job.config):
        return export_online_probes(ctx, checkpoint_of(job, step), out)
    train_url = codes_of(job, step)["train"] if kind == "head" else stores(job, step)[0].url
    return run_probes(ctx, job.config, FeatureStore.open(train_url), out)


def probe_then(job: Build, step: Step, manifest: dict[str, Any]) -> None:
    for key in ("centroids", "linear"):  # files the val pass loads: never outside the work folder
        if key in manifest["outputs"]:
            inside(manifest["outputs"][key], job.workdir, manifest_path(job.sdir, step.name))


def body(job: Build, step: Step, ctx: StageContext) -> dict[str, Any]:
    """Predictions on val for every probe, the metrics (before/after CRF), metrics.json, report.md, pictures."""
    from pipeline.reporting.report import console_summary, paper_comparison, with_paper_numbers, write_report
    from pipeline.reporting.tensorboard import write_evaluation

    config, e_cfg, run, method = job.config, job.config["evaluate"], step.run, method_of(job.config).name
    train_store, val_store = stores(job, step)
    if "label" not in val_store.names():
        return clusters_body(job, step, ctx, train_store, val_store)
    kinds = {"head": codes_of(job, step)["val"], **({"raw": val_store.url} if e_cfg["baselines"] else {})}
    probe_outputs = {kind: job.upstream(step, f"probe-{kind}")["outputs"] for kind in kinds}
    out, rdir = paths.eval_dir(config, job.workdir, run), paths.run_dir(config, job.workdir, run)
    out.mkdir(parents=True, exist_ok=True)
    keep, t0 = min(e_cfg["pictures"], len(val_store)), time.perf_counter()
    rows, predictions, notes = result_rows(config, ctx.log, kinds, val_store, probe_outputs, keep)
    pictures = write_pictures(rows, predictions, val_store, config, out, keep, kind_label("head", method))
    comparison = paper_comparison(config, train_store.random_init, protocol_of(config), crf_enabled(config))
    settings = ran_settings(config, probe_outputs, train_store)
    rel = partial(relative_path, folder=out)  # metrics.json's paths: relative to its own folder
    metrics = {
        "dataset": config["dataset"]["name"], "run": run, "method": method, "random_init": train_store.random_init,
        "class_names": val_store.attrs.get("class_names") or [str(c) for c in range(config["dataset"]["n_classes"])],
        "protocol": {**protocol_lines(config, settings, checkpoint_of(job, step), train_store, val_store,
                                      overcluster_text(e_cfg, rows, notes), rel),
                     **method_of(config).protocol_notes(config)},  # the method's own lines (STEGO: flip averaging)
        "protocol_settings": settings,
        "paper": comparison,
        "results": with_paper_numbers([{k: v for k, v in r.items() if k != "confusion"} for r in rows], comparison),
        "probes": {k: rel(v) if k in ("dir", "centroids", "linear") else v for k, v in probe_outputs["head"].items()},
        "pictures": {name: rel(picture) for name, picture in pictures.items()},
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    save_predictions(out / PREDICTIONS, val_store, predictions, keep)  # the HTML report's browsable grid
    write_evaluation(config, metrics, out, int(job.upstream(step, "train")["outputs"].get("iterations", 0)))
    write_report(metrics, pictures, out / "report.md")
    files = {"metrics": out / "metrics.json", "report": out / "report.md", **pictures}
    if (rdir / "curves.png").exists():  # the training curves, so the console names every picture of the run
        files["training curves"] = rdir / "curves.png"
    log.info(console_summary(rows, files, train_store.random_init))
    head = next((r for r in rows if r["features"] == "head" and not r["crf"]), None)
    best = f"{head['name']} {head['miou']:.1f} mIoU / {head['acc']:.1f} Acc" if head else "no head row"
    note = " [RANDOM-INIT backbone]" if train_store.random_init else ""
    return {"metrics": str(out / "metrics.json"), "report": str(out / "report.md"), "results": rows and
            [{k: r[k] for k in ("name", "miou", "acc")} for r in rows], "random_init": train_store.random_init,
            "timings": {"evaluate_seconds": round(time.perf_counter() - t0, 3)},
            "summary": f"{best} -> {out / 'metrics.json'}{note}"}


def clusters_body(job: Build, step: Step, ctx: StageContext, train_store: FeatureStore,
                  val_store: FeatureStore) -> dict[str, Any]:
    """A val split without labels: the cluster probe's segments on every val image, reported per cluster (pixel
    share, images, example crops) with overlays; nothing is scored (docs/evaluation.md, "Without labels")."""
    from pipeline.reporting.plots import cluster_examples, overlay_grid, palette
    from pipeline.reporting.report import NO_LABELS_NOTE, clusters_console, write_report

    config, e_cfg, run, method = job.config, job.config["evaluate"], step.run, method_of(job.config)
    kinds = {"head": codes_of(job, step)["val"], **({"raw": val_store.url} if e_cfg["baselines"] else {})}
    probe_outputs = {kind: job.upstream(step, f"probe-{kind}")["outputs"] for kind in kinds}
    out = paths.eval_dir(config, job.workdir, run)
    out.mkdir(parents=True, exist_ok=True)
    keep, t0 = min(e_cfg["pictures"], len(val_store)), time.perf_counter()
    tally, kept = cluster_outputs(config, kinds, val_store, probe_outputs, keep)
    if tally is None:
        raise UserError(f"the val split of {config['dataset']['name']} has no labels and evaluate.probes = "
                        f"{e_cfg['probes']} has no cluster probe: without labels only the cluster probe can be "
                        "fitted; use --probe cluster")
    names = [f"cluster {c}" for c in range(tally.k)]
    clusters = [{**row, "name": names[row["id"]], "rgb": rgb} for row, rgb in
                zip(tally.table(), palette(tally.k).tolist(), strict=True)]
    pictures = {"clusters": out / "clusters.png"}
    cluster_examples(clusters, tally.best, pictures["clusters"],
                     title=f"{method.label} clusters on {len(val_store)} unlabelled images (examples: most pixels)")
    labels = {kind: kind_label(kind, method.name, val_store) for kind in kinds}
    columns = {f"{labels[kind]} clusters" + (" + CRF" if crf else ""): maps for (kind, crf), maps in kept.items()}
    if keep:
        pictures["overlays"] = out / "overlays.png"
        overlay_grid(val_store.read("image", 0, keep), columns, tally.k, pictures["overlays"], names)
    pictures = {name: str(path.resolve()) for name, path in pictures.items()}
    settings = ran_settings(config, probe_outputs, train_store)
    rel = partial(relative_path, folder=out)
    lines = protocol_lines(config, settings, checkpoint_of(job, step), train_store, val_store, "off", rel)
    lines.pop("ignore")
    metrics = {
        "dataset": config["dataset"]["name"], "run": run, "method": method.name, "random_init":
        train_store.random_init, "labelled": False, "class_names": names, "clusters": clusters,
        "protocol": {**lines, "scores": NO_LABELS_NOTE,
                     "val_resolution": f"{val_store.attrs['resolution']} px",
                     "overcluster": "off: it matches clusters to classes by label", **method.protocol_notes(config)},
        "protocol_settings": settings, "paper": None, "results": [],
        "probes": {k: rel(v) if k in ("dir", "centroids", "linear") else v for k, v in probe_outputs["head"].items()},
        "pictures": {name: rel(picture) for name, picture in pictures.items()},
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    save_predictions(out / PREDICTIONS, val_store, {"cluster" + (" + CRF" if crf else ""): maps
                                                    for (kind, crf), maps in kept.items() if kind == "head"}, keep)
    write_report(metrics, pictures, out / "report.md")
    files = {"metrics": out / "metrics.json", "report": out / "report.md", **pictures}
    log.info(clusters_console(clusters, len(val_store), files, train_store.random_init))
    largest = max(clusters, key=lambda c: c["pixel_share"])
    note = " [RANDOM-INIT backbone]" if train_store.random_init else ""
    return {"metrics": str(out / "metrics.json"), "report": str(out / "report.md"), "results": [],
            "clusters": tally.k, "random_init": train_store.random_init,
            "timings": {"evaluate_seconds": round(time.perf_counter() - t0, 3)},
            "summary": f"no labels: {tally.k} clusters (largest: cluster {largest['id']}, "
                       f"{largest['pixel_share']:.1f}% of pixels) -> {out / 'metrics.json'}{note}"}


# this module's functions for the stages the graph declares (pipeline/orchestration/stage.py)
implement("codes", body=codes_body, then=codes_then)
implement("probe-head", "probe-raw", body=probe_body, then=probe_then)
implement("evaluate", body=body, check=check)
