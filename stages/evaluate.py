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

The checkpoint evaluated is always the run's last one: it is never chosen on validation labels.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cache import writer
from cache.reader import FeatureStore
from cache.schema import CodesLayout
from pipeline import paths
from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.config import Config, fingerprint
from pipeline.encoders import Encoder, load_encoder
from pipeline.errors import UserError
from pipeline.files import atomic_write, atomic_write_npy, atomic_write_text
from pipeline.graph import method_of, stage_plan
from pipeline.hp.online_probes import crf_enabled, online_probe_settings, protocol_of
from pipeline.metrics import confusion_matrix, hungarian_match, remap_confusion, scores
from pipeline.overcluster import overcluster_maps
from pipeline.paths import inside
from pipeline.probes import CLUSTER_METHODS, LinearProbe, cosine_scores, linear_probe_loss
from pipeline.report import relative_path
from pipeline.runner import StageContext, manifest_path, run_stage
from pipeline.wording import plural
from stages import features_hcl
from stages import train as train_stage


def kind_label(kind: str, method: str, store: FeatureStore | None = None) -> str:
    """A row's name: the method's for the head ("HP"), what they are for raw features ("ViT-S/16 features (random
    init)", "DINO ViT-S/16": report.raw_features_label, from the store's backbone and weights)."""
    if kind != "raw":
        return method.upper()
    from pipeline.report import raw_features_label

    attrs = store.attrs if store is not None else {}
    return raw_features_label(str(attrs.get("backbone", "")), bool(attrs.get("random_init")))


def probes_of(config: Config) -> list[str]:
    probes = [p.strip() for p in config["evaluate"]["probes"].split(",") if p.strip()]
    unknown = set(probes) - {"cluster", "linear"}
    if unknown:
        raise UserError(f"evaluate.probes: unknown probe {', '.join(sorted(unknown))}; use cluster, linear or both")
    return probes


# ---------------------------------------------------------------- codes (written once)
def encode_range(encoder: Encoder, source: FeatureStore, start: int, stop: int, batch: int) -> torch.Tensor:
    """The head's codes (n, D, h, w) of samples [start, stop) of `source`, `batch` samples per forward."""
    arrays = {name: torch.from_numpy(source.read(name, start, stop)).float() for name in encoder.arrays}
    with torch.no_grad():
        return torch.cat([encoder.from_arrays({k: v[i:i + batch] for k, v in arrays.items()})
                          for i in range(0, stop - start, batch)])


def write_codes(encoder: Encoder, source: FeatureStore, url: str, fresh: bool, batch: int, fp: str) -> FeatureStore:
    """The head's codes of every sample of `source` into a store (labels copied), resumable per chunk."""
    n, h, _, _ = source.array("feat").shape
    label_size = source.array("label").shape[1] if "label" in source.names() else 0
    layout = CodesLayout(n, h, encoder.dim, label_size)
    attrs = {"dataset": source.attrs["dataset"], "split": source.attrs["split"], "backbone": source.attrs["backbone"],
             "resolution": source.attrs["resolution"], "fingerprint": fp, "random_init": source.random_init,
             "kind": "codes", "source": source.url}
    group = writer.create_store(url, layout, source.chunk_size, attrs, fresh)
    pending = np.flatnonzero(~writer.finished_chunks(group))
    for chunk in tqdm(pending, desc=f"codes {source.attrs['split']}", unit="chunk", leave=False):
        start, stop = writer.chunk_range(group, int(chunk))
        codes = encode_range(encoder, source, start, stop, batch)
        data = {"feat": codes.permute(0, 2, 3, 1).to(torch.float16).numpy()}
        if label_size:
            data["label"] = source.read("label", start, stop)
        writer.write_chunk(group, int(chunk), data)
    writer.mark_complete(group)
    return FeatureStore.open(url)


# ---------------------------------------------------------------- probes
def fit_clusters(store: FeatureStore, k: int, method: str, max_patches: int, seed: int) -> np.ndarray:
    """Centroids fitted on (a random sample of) the training patches."""
    n, h, w, _ = store.array("feat").shape
    rng = np.random.default_rng(seed)
    images = np.sort(rng.choice(n, min(n, -(-max_patches // (h * w))), replace=False))
    patches = store.gather("feat", images).reshape(-1, store.array("feat").shape[-1]).astype(np.float32)
    if len(patches) > max_patches:
        patches = patches[rng.choice(len(patches), max_patches, replace=False)]
    if method not in CLUSTER_METHODS:
        raise UserError(f"evaluate.cluster_method must be one of {', '.join(CLUSTER_METHODS)}, got '{method}'")
    return CLUSTER_METHODS[method](patches, k, seed=seed)


def linear_optimizer(config: Config) -> dict[str, Any]:
    """The fitted linear probe's optimizer (`evaluate.linear_optimizer`), as data: Adam(linear_lr) for HP (docs/hp.md
    §8); for HCL runs the HCL reference's linear fine-tuning, SGD with momentum and weight decay, lr x 0.1 from
    `lr_drop_epoch` (0-based) on (docs/hcl.md §5)."""
    e_cfg = config["evaluate"]
    name = str(e_cfg["linear_optimizer"]).strip().lower()
    if name == "auto":
        name = "sgd" if method_of(config) == "hcl" else "adam"
    if name == "adam":
        return {"optimizer": "Adam", "lr": e_cfg["linear_lr"]}
    if name == "sgd":
        return {"optimizer": "SGD", "lr": e_cfg["linear_sgd_lr"], "momentum": e_cfg["linear_sgd_momentum"],
                "weight_decay": e_cfg["linear_sgd_weight_decay"], "lr_drop_epoch": e_cfg["linear_sgd_drop_epoch"],
                "lr_drop": 0.1}
    raise UserError(f"evaluate.linear_optimizer must be adam, sgd or auto, got '{e_cfg['linear_optimizer']}' (auto: "
                    "Adam for HP, the HCL reference's SGD for train.method = hcl)")


def train_linear(store: FeatureStore, n_classes: int, e_cfg: dict[str, Any], path: Path, log,
                 optimizer_settings: dict[str, Any] | None = None) -> LinearProbe:
    """Cross-entropy on the training codes and labels, checkpointed every epoch; Adam(linear_lr) (§8) unless
    `optimizer_settings` (from `linear_optimizer`) say otherwise."""
    torch.manual_seed(e_cfg["seed"])
    probe = LinearProbe(store.array("feat").shape[-1], n_classes)
    opt = optimizer_settings or {"optimizer": "Adam", "lr": e_cfg["linear_lr"]}
    if opt["optimizer"] == "SGD":
        optimizer = torch.optim.SGD(probe.parameters(), lr=opt["lr"], momentum=opt["momentum"],
                                    weight_decay=opt["weight_decay"])
        settings = {"seed": e_cfg["seed"], "batch_size": e_cfg["batch_size"], **opt}
        if 0 < e_cfg["linear_epochs"] <= opt["lr_drop_epoch"]:
            log(f"linear probe: SGD ends before its lr drop at epoch {opt['lr_drop_epoch']} (0-based; "
                f"evaluate.linear_epochs = {e_cfg['linear_epochs']}): its last weights are from lr {opt['lr']}")
    else:  # the settings Adam checkpoints were always written with
        optimizer = torch.optim.Adam(probe.parameters(), lr=opt["lr"])
        settings = {"seed": e_cfg["seed"], "linear_lr": opt["lr"], "batch_size": e_cfg["batch_size"]}
    first = 0
    state = load_checkpoint(path) if path.exists() else None
    if state and (state.get("settings") != settings or state["epoch"] > e_cfg["linear_epochs"]):
        log("linear probe: its settings changed, training it again")
        state = None
    if state:
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        first = state["epoch"]
        log(f"linear probe: resuming after epoch {first}")
    for epoch in range(first, e_cfg["linear_epochs"]):
        if opt.get("lr_drop_epoch"):  # the reference's step schedule, set from the epoch so that resume agrees
            for group in optimizer.param_groups:
                group["lr"] = opt["lr"] * (opt["lr_drop"] if epoch >= opt["lr_drop_epoch"] else 1.0)
        batches = store.batches(["feat", "label"], e_cfg["batch_size"], shuffle_seed=e_cfg["seed"] + epoch)
        for batch in tqdm(batches, desc=f"linear probe epoch {epoch + 1}", leave=False):
            loss = linear_probe_loss(probe, batch["feat"].float().permute(0, 3, 1, 2), batch["label"], n_classes)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_checkpoint(path, {"probe": probe.state_dict(), "optimizer": optimizer.state_dict(),
                                           "rng": torch.get_rng_state(), "epoch": epoch + 1, "settings": settings})
    return probe


def run_probes(ctx: StageContext, config: Config, store: FeatureStore, out: Path) -> dict[str, Any]:
    e_cfg, n_classes = config["evaluate"], config["dataset"]["n_classes"]
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Any] = {"dir": str(out)}
    probes = probes_of(config)
    if "cluster" in probes:  # refitted when its own settings (or the inputs) changed, else reused
        path = out / "centroids.npy"
        settings = json.dumps({"inputs": ctx.manifest["inputs"], **{k: e_cfg[k] for k in (
            "cluster_method", "extra_clusters", "cluster_patches", "seed")}}, sort_keys=True)
        meta = out / "centroids.json"
        if ctx.forced or not path.exists() or not meta.exists() or meta.read_text() != settings:
            centroids = fit_clusters(store, n_classes + e_cfg["extra_clusters"], e_cfg["cluster_method"],
                                     e_cfg["cluster_patches"], e_cfg["seed"])
            atomic_write_npy(path, centroids)
            atomic_write_text(meta, settings)
        outputs["centroids"] = str(path)
    if "linear" in probes:
        if "label" not in store.names():
            ctx.log("the training split has no labels: no linear probe")
        else:
            if ctx.forced:
                (out / "linear.pt").unlink(missing_ok=True)
            train_linear(store, n_classes, e_cfg, out / "linear.pt", ctx.log, linear_optimizer(config))
            outputs["linear"] = str(out / "linear.pt")
    return outputs


def export_online_probes(ctx: StageContext, checkpoint: str, out: Path) -> dict[str, Any]:
    """Protocol paper (§8): the probes trained online during `train`, taken from the run's checkpoint into the
    files the kmeans protocol writes (centroids.npy, linear.pt), so that the val pass and `predict` read both alike."""
    state = load_checkpoint(checkpoint).get("online_probes")
    if not state:
        raise UserError(f"{checkpoint} holds no online probes (evaluate.protocol = paper trains them during "
                        "`train`); retrain the run with --force, or use --set evaluate.protocol=kmeans")
    out.mkdir(parents=True, exist_ok=True)
    (out / "centroids.json").unlink(missing_ok=True)  # the kmeans protocol's reuse marker: never reuse these
    outputs: dict[str, Any] = {"dir": str(out), "online": {
        **state["settings"], "trained": state["trained"], "iterations": state["steps"],
        "linear_iterations": state["linear_steps"]}}
    if "cluster" in state["trained"]:
        centroids = torch.nn.functional.normalize(state["clusters"].float(), dim=1)  # cosine: the norm is unused
        atomic_write_npy(out / "centroids.npy", centroids.cpu().numpy())
        outputs["centroids"] = str(out / "centroids.npy")
    if "linear" in state["trained"]:
        save_checkpoint(out / "linear.pt", {"probe": state["linear"], "online": True,
                                            "iterations": state["linear_steps"], "settings": state["settings"]})
        outputs["linear"] = str(out / "linear.pt")
    elif "linear" in state["settings"]["probes"]:
        ctx.log("the training split has no labels: no linear probe")
    return outputs


def protocol_settings(config: Config, protocol: str, crf: bool, online: dict[str, Any] | None,
                      train_store: FeatureStore) -> dict[str, Any]:
    """Every setting of the evaluation protocol, as data (metrics.json `protocol_settings`)."""
    e_cfg, n_classes = config["evaluate"], config["dataset"]["n_classes"]
    k = n_classes + e_cfg["extra_clusters"]
    assignment = ("argmax cosine after bilinear upsampling of the codes to the label size; Hungarian on the whole "
                  "val set")
    if protocol == "paper":
        _, h, w, _ = train_store.array("feat").shape
        label_size = train_store.array("label").shape[1:] if "label" in train_store.names() else None
        codes = (f"detached S(f) of every training batch (dropout on), {h}x{w} grid of the "
                 f"{train_store.attrs.get('resolution')} px training crops")
        cluster = {"kind": "ClusterLookup (the reference's), trained online", "centroids": k,
                   "init": f"standard normal (torch.randn), seed {e_cfg['seed']}", "optimizer": "Adam",
                   "lr": e_cfg["cluster_lr"], "loss": "-mean over patches of max_k cos(s, c_k), at the code grid",
                   "inputs": codes, "iterations": online["iterations"] if online else None,
                   "assignment": assignment}
        linear = {"kind": "1x1 conv D -> n_classes, trained online", "init": f"PyTorch default, seed {e_cfg['seed']}",
                  "optimizer": "Adam", "lr": e_cfg["linear_lr"],
                  "loss": f"cross-entropy at label size {label_size and list(label_size)} (logits upsampled "
                          f"bilinearly), labels outside 0..{n_classes - 1} ignored",
                  "inputs": codes, "iterations": online["linear_iterations"] if online else None,
                  "prediction": "logits upsampled bilinearly to the label size, argmax"}
    else:
        cluster = {"kind": e_cfg["cluster_method"], "centroids": k, "seed": e_cfg["seed"],
                   "fitted_on": f"up to {e_cfg['cluster_patches']} patches of the finished head's training codes",
                   "assignment": assignment}
        _, h, w, _ = train_store.array("feat").shape
        label_size = "x".join(map(str, train_store.array("label").shape[1:])) if "label" in train_store.names() else "-"
        linear = {"kind": "1x1 conv D -> n_classes, fitted after training", **linear_optimizer(config),
                  "epochs": e_cfg["linear_epochs"], "batch_size": e_cfg["batch_size"],
                  "resolution": f"{train_store.attrs.get('resolution')} px training crops as cached ({h}x{w} "
                                f"features, labels {label_size}), no augmentation",
                  "loss": "cross-entropy at label size (logits upsampled bilinearly)"}
    probes = probes_of(config) if protocol == "kmeans" or online is None else online["trained"]
    settings = {"name": protocol, "checkpoint": "last", "cluster_probe": cluster if "cluster" in probes else None,
                "linear_probe": linear if "linear" in probes else None, "crf": {"enabled": crf}}
    if crf:
        from pipeline.crf import CRF_PARAMS

        settings["crf"].update(CRF_PARAMS, unary="softmax of the upsampled logits (cluster probe: 2·cos)",
                               image="uint8, BGR")
    if e_cfg["baselines"]:
        settings["raw_features"] = (f"{e_cfg['cluster_method']} centroids and a linear probe fitted after training "
                                    "(protocol kmeans)"
                                    + ("; the reference evaluates no raw features" if protocol == "paper" else ""))
    return settings


def probe_lines(settings: dict[str, Any]) -> dict[str, str]:
    """The report's one-line descriptions of the probes, from `protocol_settings`."""
    lines = {}
    for key in ("cluster_probe", "linear_probe", "raw_features"):
        value = settings.get(key)
        if isinstance(value, dict):
            lines[key] = "; ".join(f"{k} {v}" for k, v in value.items())
        elif value:
            lines[key] = value
    return lines


# ---------------------------------------------------------------- predictions and metrics on val
def val_predictions(store: FeatureStore, images: FeatureStore, probe_outputs: dict[str, Any], n_classes: int,
                    batch: int):
    """Yield (index, {probe: logits (B, K, H, W)}, labels, images) over the val set, in store order."""
    centroids = torch.from_numpy(np.load(probe_outputs["centroids"])) if "centroids" in probe_outputs else None
    linear = None
    if "linear" in probe_outputs:
        linear = LinearProbe(store.array("feat").shape[-1], n_classes)
        linear.load_state_dict(load_checkpoint(probe_outputs["linear"])["probe"])
        linear.eval()
    for start in range(0, len(store), batch):
        stop = min(start + batch, len(store))
        codes = torch.from_numpy(store.read("feat", start, stop)).float().permute(0, 3, 1, 2)
        labels = images.read("label", start, stop)
        size = labels.shape[-2:]
        logits = {}
        with torch.no_grad():
            if centroids is not None:  # §8: cluster logits = 2·cos at label resolution
                logits["cluster"] = 2 * cosine_scores(codes, centroids, size)
            if linear is not None:
                logits["linear"] = linear(codes, size)
        yield start, logits, labels, images.read("image", start, stop)


def evaluate_kind(kind: str, store: FeatureStore, val_images: FeatureStore, probe_outputs: dict[str, Any],
                  config: Config, keep: int, label: str,
                  protocol: str = "kmeans") -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Result rows (and the first `keep` predictions) of one feature kind, with and without CRF; each row names
    the `protocol` its probes come from."""
    e_cfg, n_classes = config["evaluate"], config["dataset"]["n_classes"]
    crf_states = [False, True] if crf_enabled(config) else [False]
    confusions: dict[tuple[str, bool], np.ndarray] = {}
    kept: dict[tuple[str, bool], list[np.ndarray]] = {}
    for _, logits, labels, images in tqdm(
        val_predictions(store, val_images, probe_outputs, n_classes, e_cfg["batch_size"]),
        total=-(-len(store) // e_cfg["batch_size"]), desc=f"evaluate {kind}", leave=False,
    ):
        for probe, probe_logits in logits.items():
            k = probe_logits.shape[1]
            for crf in crf_states:
                if crf:
                    from pipeline.crf import crf_labels

                    pred = crf_labels(images, probe_logits.numpy().astype(np.float32), workers=e_cfg["crf_workers"],
                                      scheduler=e_cfg["crf_scheduler"], address=e_cfg["crf_address"] or None)
                else:
                    pred = probe_logits.argmax(1).numpy()
                key = (probe, crf)
                confusions[key] = confusions.get(key, 0) + confusion_matrix(pred, labels, k, n_classes)
                have = sum(len(p) for p in kept.get(key, []))
                if have < keep:  # only the first `keep` images are drawn
                    kept.setdefault(key, []).append(pred[:keep - have])
    rows, predictions = [], {}
    for (probe, crf), conf in confusions.items():
        mapping = hungarian_match(conf) if probe == "cluster" else np.arange(conf.shape[1])
        matched = remap_confusion(conf, mapping)
        s = scores(matched)
        rows.append({
            "name": f"{label} {probe}" + (" + CRF" if crf else ""), "features": kind, "probe": probe,
            "protocol": protocol,
            "cluster_to_class": mapping.tolist() if probe == "cluster" else None,
            "crf": crf, "miou": round(100 * s.miou, 2), "acc": round(100 * s.acc, 2),
            "iou": [None if v is None else round(100 * v, 2) for v in s.iou],
            "confusion": matched[:, :n_classes].tolist(),
        })
        if (probe, crf) in kept:  # keys "cluster", "cluster + CRF", ...: each with its own matching
            pred = np.concatenate(kept[(probe, crf)])
            predictions[probe + (" + CRF" if crf else "")] = (np.where(mapping[pred] >= 0, mapping[pred], 255)
                                                              if probe == "cluster" else pred)
    return rows, predictions


def write_pictures(rows, predictions, val_images: FeatureStore, config: Config, out: Path, keep: int,
                   label: str) -> dict:
    from pipeline import plots

    n_classes = config["dataset"]["n_classes"]
    names = val_images.attrs.get("class_names") or [str(c) for c in range(n_classes)]
    pictures = {}
    if keep and predictions:
        columns = {"ground truth": val_images.read("label", 0, keep)}
        columns.update({f"{label} {probe}": pred for probe, pred in predictions.items()})
        pictures["overlays"] = out / "overlays.png"
        plots.overlay_grid(val_images.read("image", 0, keep), columns, n_classes, pictures["overlays"], names)
    head_cluster = next((r for r in rows if r["features"] == "head" and r["probe"] == "cluster" and not r["crf"]), None)
    if head_cluster:
        pictures["confusion"] = out / "confusion.png"
        plots.confusion_png(np.asarray(head_cluster["confusion"]), names, pictures["confusion"],
                            title=f"{label} cluster probe, after Hungarian matching")
    pictures["iou"] = out / "iou.png"
    plots.iou_bars({r["name"]: r["iou"] for r in rows}, names, pictures["iou"], title="per-class IoU (%)")
    return {k: str(Path(v).resolve()) for k, v in pictures.items()}


PREDICTIONS = "predictions.npz"  # eval/: the drawn val images, their labels and the head's predictions


def save_predictions(path: Path, val_images: FeatureStore, predictions: dict[str, np.ndarray], keep: int) -> None:
    """The first `keep` val images, labels and the head's predictions per probe ("cluster", "cluster + CRF", ...;
    class ids, 255 = ignore) as one .npz (`hp-pipe report --html` draws its grid from it); none when keep = 0."""
    path.unlink(missing_ok=True)
    if not keep or not predictions:
        return
    arrays = {"image": val_images.read("image", 0, keep), "label": val_images.read("label", 0, keep),
              **{f"pred/{name}": pred.astype(np.uint8) for name, pred in predictions.items()}}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: savez would append ".npz" to a path
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def overcluster_row(kind: str, store: FeatureStore, val_images: FeatureStore, config: Config, label: str) -> dict:
    """The overclustering protocol (docs/hcl.md §5) on one feature kind's val features, as a result row."""
    e_cfg, n_classes = config["evaluate"], config["dataset"]["n_classes"]
    features = store.read("feat", 0, len(store))  # float16: standardize_pca converts block by block
    out = overcluster_maps(features, val_images.read("label", 0, len(store)), n_classes, e_cfg["overcluster_k"],
                           e_cfg["overcluster_pca"], tuple(range(e_cfg["overcluster_seeds"])),
                           e_cfg["overcluster_size"], e_cfg["overcluster_iterations"], e_cfg["overcluster_restarts"])
    iou = [round(100 * float(np.mean([r["iou"][c] for r in out["per_seed"]])), 2) for c in range(n_classes)]
    pct = {key: round(100 * out[key], 2) for key in out if key.endswith(("_mean", "_std"))}
    # "acc" is pixel accuracy, as in every row; "acc_ref" the reference's "Acc" Σtp / Σ(tp + fp + fn)
    return {
        "name": f"{label} overcluster K={out['k']}", "features": kind, "probe": "overcluster", "k": out["k"],
        "note": out["note"], "cluster_to_class": None, "crf": False, "miou": pct["miou_mean"],
        "miou_std": pct["miou_std"],
        "acc": pct["pixel_acc_mean"], "acc_std": pct["pixel_acc_std"], "acc_ref": pct["acc_ref_mean"],
        "acc_ref_std": pct["acc_ref_std"], "seeds": len(out["per_seed"]), "iou": iou, "confusion": None,
    }


# ---------------------------------------------------------------- the stages
def run(config: Config, workdir: Path, run: str | None = None, force: bool = False) -> dict[str, Any]:
    probes_of(config)  # a typo fails before any work
    linear_optimizer(config)
    method = method_of(config)
    protocol = protocol_of(config)
    if protocol == "paper" and method != "hp":
        raise UserError(f"evaluate.protocol = paper is HP's evaluation (probes trained online with the HP head, "
                        f"docs/hp.md §8); {method.upper()} has its own: use --set evaluate.protocol=kmeans")
    online = online_probe_settings(config)
    crf = crf_enabled(config)
    run = run or method
    label = kind_label("head", method)
    train_manifest = train_stage.run(config, workdir, run, replace=force)  # --force: may retrain a changed run
    val_manifest = features_hcl.run_for_method(config, workdir, "val")
    sdir, rdir = paths.stage_dir(config, workdir), paths.run_dir(config, workdir, run)
    e_cfg = config["evaluate"]
    train_store = FeatureStore.open(train_manifest["outputs"]["store"])
    val_store = FeatureStore.open(val_manifest["outputs"]["store"])
    if "label" not in val_store.names():
        raise UserError(f"the val split of {config['dataset']['name']} has no labels ({val_store.url}): "
                        "nothing to evaluate against")
    checkpoint = str(inside(train_manifest["outputs"]["checkpoint"], workdir, manifest_path(sdir, f"train-{run}")))
    inputs = {"train": train_manifest["fingerprint"], val_manifest["stage"]: val_manifest["fingerprint"]}

    # codes: written once, reused by both probes
    # protocol paper: the head's probes were trained during `train`, only the val codes are needed
    splits = {"val": val_store} if online else {"train": train_store, "val": val_store}

    def codes_body(ctx: StageContext) -> dict[str, Any]:
        encoder = load_encoder(checkpoint)
        urls = {}
        for split, source in splits.items():
            url = str(paths.codes_dir(rdir) / f"{split}.zarr")
            write_codes(encoder, source, url, ctx.fresh, e_cfg["batch_size"], ctx.fingerprint)
            urls[split] = url
        counts = " and ".join(plural(len(source), f"{split} crop") for split, source in splits.items())
        return {**urls, "summary": f"codes of {counts}"}

    codes_cfg = {"run": run, "batch_size": e_cfg["batch_size"], **({"splits": list(splits)} if online else {})}
    codes = run_stage(sdir, f"codes-{run}", codes_cfg, inputs, codes_body, force)["outputs"]
    codes = {split: str(inside(url, workdir, manifest_path(sdir, f"codes-{run}"))) for split, url in codes.items()}
    kinds = {"head": (codes.get("train"), codes["val"])}
    if e_cfg["baselines"]:
        kinds["raw"] = (train_store.url, val_store.url)
    probe_cfg = {k: e_cfg[k] for k in ("probes", "cluster_method", "extra_clusters", "cluster_patches",
                                       "linear_epochs", "linear_lr", "batch_size", "seed")}
    probe_cfg["linear_optimizer"] = linear_optimizer(config)
    probe_outputs = {}
    for kind, (train_url, _) in kinds.items():
        probe_inputs = {**inputs, f"codes-{run}": fingerprint(codes)} if kind == "head" else inputs
        if kind == "head" and online:  # protocol paper (§8): the probes trained online, from the checkpoint
            kind_cfg = {"run": run, "protocol": protocol, **online}
            body = partial(export_online_probes, checkpoint=checkpoint, out=paths.probe_dir(rdir, "head"))
        else:
            kind_cfg = {"run": run, **probe_cfg}
            body = partial(run_probes, config=config, store=FeatureStore.open(train_url),
                           out=paths.probe_dir(rdir, kind))
        probe_outputs[kind] = run_stage(sdir, f"probe-{kind}-{run}", kind_cfg, probe_inputs, body, force)["outputs"]
        for key in ("centroids", "linear"):  # files the val pass loads: never outside the work folder
            if key in probe_outputs[kind]:
                inside(probe_outputs[kind][key], workdir, manifest_path(sdir, f"probe-{kind}-{run}"))

    # the same config and inputs `hp-pipe status` computes, so that it can tell whether this stage is current;
    # the probes' own settings are in the evaluate section, hence in this fingerprint too
    stage_config, plan_inputs = stage_plan(config, workdir)["evaluate"]

    def evaluate_body(ctx: StageContext) -> dict[str, Any]:
        out = paths.eval_dir(config, workdir, run)
        out.mkdir(parents=True, exist_ok=True)
        keep = min(e_cfg["pictures"], len(val_store))
        t0 = time.perf_counter()
        rows, predictions, notes = [], {}, []
        for kind, (_, val_url) in kinds.items():
            kind_store = FeatureStore.open(val_url)
            kind_rows, kind_pred = evaluate_kind(kind, kind_store, val_store, probe_outputs[kind], config, keep,
                                                 kind_label(kind, method, val_store),
                                                 protocol if kind == "head" else "kmeans")
            rows += kind_rows
            if e_cfg["overcluster"]:
                rows.append(overcluster_row(kind, kind_store, val_store, config, kind_label(kind, method, val_store)))
                note = rows[-1].pop("note")
                if note and note not in notes:  # said once, not once per feature kind (nor faiss's per k-means run)
                    notes.append(note)
                    ctx.log(note)
            if kind == "head":
                predictions = kind_pred
        rows.sort(key=lambda r: (r["features"] != "raw", r["probe"], r["crf"]))
        pictures = write_pictures(rows, predictions, val_store, config, out, keep, label)
        from pipeline.report import paper_comparison, with_paper_numbers

        comparison = paper_comparison(config, train_store.random_init, protocol, crf)
        settings = protocol_settings(config, protocol, crf, probe_outputs["head"].get("online"), train_store)
        ran = {kind: [p for p, key in (("cluster", "centroids"), ("linear", "linear")) if key in outputs]
               for kind, outputs in probe_outputs.items()}
        for probe in ("cluster", "linear"):  # the protocol lists only the probes that ran
            if probe not in ran["head"]:
                settings[f"{probe}_probe"] = None
        if settings.get("raw_features") and not ran.get("raw"):
            settings["raw_features"] = None
        elif settings.get("raw_features") and ran["raw"] != ["cluster", "linear"]:
            settings["raw_features"] = settings["raw_features"].replace(
                "centroids and a linear probe", "centroids" if ran["raw"] == ["cluster"] else "a linear probe")
        used_k = sorted({r["k"] for r in rows if r["probe"] == "overcluster"})
        k_text = ("K = " + " / ".join(map(str, used_k))
                  + (f" (evaluate.overcluster_k = {e_cfg['overcluster_k']}, capped at the number of val patches)"
                     if used_k and used_k[-1] < e_cfg["overcluster_k"] else ""))
        rel = partial(relative_path, folder=out)  # metrics.json's paths: relative to its own folder
        metrics = {
            "dataset": config["dataset"]["name"], "run": run, "method": method, "random_init": train_store.random_init,
            "class_names": val_store.attrs.get("class_names")
            or [str(c) for c in range(config["dataset"]["n_classes"])],
            "protocol": {
                "name": protocol + (" (the reference's: probes trained online during training, docs/hp.md §8)"
                                    if protocol == "paper" else " (probes fitted after training)"),
                "checkpoint": f"{rel(checkpoint)} (the last one; never chosen on validation labels)",
                "backbone": val_store.attrs["backbone"] + (" [random-init]" if train_store.random_init else ""),
                "val_resolution": f"{val_store.attrs['resolution']} px, labels at that size"
                + (f" ({val_store.attrs['geometry']['resize']})" if "resize" in val_store.attrs.get("geometry", {})
                   else ""),  # HCL's store: the whole image, docs/hcl.md §5
                "val_images": len(val_store),
                **probe_lines(settings),
                "crf": ("on and off (both reported): " + ", ".join(f"{k} {v}" for k, v in settings["crf"].items()
                                                                   if k != "enabled")) if crf else "off",
                "overcluster": (f"standardize, PCA {e_cfg['overcluster_pca']}, k-means {k_text} "
                                f"on the val patches, {e_cfg['overcluster_seeds']} seeds x "
                                f"{e_cfg['overcluster_restarts']} restarts x {e_cfg['overcluster_iterations']} "
                                f"iterations, many-to-one by precision, labels and cluster maps resized to "
                                f"{e_cfg['overcluster_size']}x{e_cfg['overcluster_size']} (torch nearest, floor "
                                "index); mIoU over all classes (absent ones score 0); Acc = pixel accuracy, "
                                "acc_ref = the HCL reference's \"Acc\" Σtp / Σ(tp + fp + fn); mean ± std over seeds"
                                + "".join(f". Note: {n}" for n in notes))
                if e_cfg["overcluster"] else "off",
                "ignore": f"labels outside 0..{config['dataset']['n_classes'] - 1}",
            },
            "protocol_settings": settings,
            "paper": comparison,
            "results": with_paper_numbers([{k: v for k, v in r.items() if k != "confusion"} for r in rows], comparison),
            "probes": {k: rel(v) if k in ("dir", "centroids", "linear") else v
                       for k, v in probe_outputs["head"].items()},
            "pictures": {name: rel(picture) for name, picture in pictures.items()},
        }
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        save_predictions(out / PREDICTIONS, val_store, predictions, keep)  # the HTML report's browsable grid
        from pipeline.tensorboard import write_evaluation

        write_evaluation(config, metrics, out, int(train_manifest["outputs"].get("iterations", 0)))
        from pipeline.report import console_summary, write_report

        write_report(metrics, pictures, out / "report.md")
        files = {"metrics": out / "metrics.json", "report": out / "report.md", **pictures}
        if (rdir / "curves.png").exists():  # the training curves, so the console names every picture of the run
            files["training curves"] = rdir / "curves.png"
        print(console_summary(rows, files, train_store.random_init), flush=True)
        head = next((r for r in rows if r["features"] == "head" and not r["crf"]), None)
        best = f"{head['name']} {head['miou']:.1f} mIoU / {head['acc']:.1f} Acc" if head else "no head row"
        note = " [RANDOM-INIT backbone]" if train_store.random_init else ""
        return {"metrics": str(out / "metrics.json"), "report": str(out / "report.md"), "results": rows and
                [{k: r[k] for k in ("name", "miou", "acc")} for r in rows], "random_init": train_store.random_init,
                "timings": {"evaluate_seconds": round(time.perf_counter() - t0, 3)},
                "summary": f"{best} -> {out / 'metrics.json'}{note}"}

    return run_stage(sdir, f"evaluate-{run}", {**stage_config, "run": run}, plan_inputs, evaluate_body, force)
