"""The evaluation of docs/hp.md §8 and docs/hcl.md §5, as library code: the probes (fitted k-means / Adam centroids,
the linear probe, or the probes trained online taken from a checkpoint), predictions and metrics on val (with and
without CRF), overclustering, and what metrics.json, report.md and the pictures say. The `evaluate` stages
(stages/evaluate.py) call these; nothing here reads a manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cache.reader import FeatureStore
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.evaluation.clusters import ClusterTally
from pipeline.evaluation.metrics import confusion_matrix, hungarian_match, remap_confusion, scores
from pipeline.evaluation.online_probes import crf_enabled, protocol_of
from pipeline.evaluation.overcluster import overcluster_maps
from pipeline.evaluation.probes import (
    CLUSTER_METHODS,
    LinearProbe,
    cosine_scores,
    linear_optimizer,
    linear_probe_loss,
    probes_of,
)
from pipeline.files import atomic_write, atomic_write_npy, atomic_write_text
from pipeline.orchestration.runner import StageContext
from pipeline.training.checkpoints import load_checkpoint, save_checkpoint


def kind_label(kind: str, method: str, store: FeatureStore | None = None) -> str:
    """A row's name: the method's for the head ("HP"), what they are for raw features ("ViT-S/16 features (random
    init)", "DINO ViT-S/16": report.raw_features_label, from the store's backbone and weights)."""
    if kind != "raw":
        return method.upper()
    from pipeline.reporting.report import raw_features_label

    attrs = store.attrs if store is not None else {}
    return raw_features_label(str(attrs.get("backbone", "")), bool(attrs.get("random_init")))


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
        from pipeline.evaluation.crf import CRF_PARAMS

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
    """Yield (index, {probe: logits (B, K, H, W)}, labels, images) over the val set, in store order; labels are
    None when the split has none (the logits are then at the images' size)."""
    centroids = torch.from_numpy(np.load(probe_outputs["centroids"])) if "centroids" in probe_outputs else None
    linear = None
    if "linear" in probe_outputs:
        linear = LinearProbe(store.array("feat").shape[-1], n_classes)
        linear.load_state_dict(load_checkpoint(probe_outputs["linear"])["probe"])
        linear.eval()
    for start in range(0, len(store), batch):
        stop = min(start + batch, len(store))
        codes = torch.from_numpy(store.read("feat", start, stop)).float().permute(0, 3, 1, 2)
        labels = images.read("label", start, stop) if "label" in images.names() else None
        pixels = images.read("image", start, stop)
        size = pixels.shape[1:3] if labels is None else labels.shape[-2:]
        logits = {}
        with torch.no_grad():
            if centroids is not None:  # §8: cluster logits = 2·cos at label resolution
                logits["cluster"] = 2 * cosine_scores(codes, centroids, size)
            if linear is not None:
                logits["linear"] = linear(codes, size)
        yield start, logits, labels, pixels


def probe_labels(images: np.ndarray, logits: torch.Tensor, e_cfg: dict[str, Any], crf: bool) -> np.ndarray:
    """(B, H, W) labels from a probe's (B, K, H, W) logits: the argmax, or with `crf` the dense CRF on the images
    (evaluate.crf_workers / crf_scheduler / crf_address decide where it runs)."""
    if not crf:
        return logits.argmax(1).numpy()
    from pipeline.evaluation.crf import crf_labels

    return crf_labels(images, logits.numpy().astype(np.float32), workers=e_cfg["crf_workers"],
                      scheduler=e_cfg["crf_scheduler"], address=e_cfg["crf_address"] or None)


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
                pred = probe_labels(images, probe_logits, e_cfg, crf)
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
    from pipeline.reporting import plots

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
    """The first `keep` val images, labels (when the split has them) and the head's predictions per probe
    ("cluster", "cluster + CRF", ...; class ids, or cluster ids without labels; 255 = ignore) as one .npz
    (`hp-pipe report --html` draws its grid from it); none when keep = 0."""
    path.unlink(missing_ok=True)
    if not keep or not predictions:
        return
    arrays = {"image": val_images.read("image", 0, keep),
              **({"label": val_images.read("label", 0, keep)} if "label" in val_images.names() else {}),
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


def ran_settings(config: Config, probe_outputs: dict[str, dict[str, Any]], train_store: FeatureStore
                 ) -> dict[str, Any]:
    """`protocol_settings`, listing only the probes that ran."""
    settings = protocol_settings(config, protocol_of(config), crf_enabled(config),
                                 probe_outputs["head"].get("online"), train_store)
    ran = {kind: [p for p, key in (("cluster", "centroids"), ("linear", "linear")) if key in outputs]
           for kind, outputs in probe_outputs.items()}
    for probe in ("cluster", "linear"):
        if probe not in ran["head"]:
            settings[f"{probe}_probe"] = None
    if settings.get("raw_features") and not ran.get("raw"):
        settings["raw_features"] = None
    elif settings.get("raw_features") and ran["raw"] != ["cluster", "linear"]:
        settings["raw_features"] = settings["raw_features"].replace(
            "centroids and a linear probe", "centroids" if ran["raw"] == ["cluster"] else "a linear probe")
    return settings


def overcluster_text(e_cfg: dict[str, Any], rows: list[dict], notes: list[str]) -> str:
    """metrics.json's one line on the overclustering protocol (docs/hcl.md §5)."""
    if not e_cfg["overcluster"]:
        return "off"
    used_k = sorted({r["k"] for r in rows if r["probe"] == "overcluster"})
    k_text = ("K = " + " / ".join(map(str, used_k))
              + (f" (evaluate.overcluster_k = {e_cfg['overcluster_k']}, capped at the number of val patches)"
                 if used_k and used_k[-1] < e_cfg["overcluster_k"] else ""))
    return (f"standardize, PCA {e_cfg['overcluster_pca']}, k-means {k_text} "
            f"on the val patches, {e_cfg['overcluster_seeds']} seeds x "
            f"{e_cfg['overcluster_restarts']} restarts x {e_cfg['overcluster_iterations']} "
            f"iterations, many-to-one by precision, labels and cluster maps resized to "
            f"{e_cfg['overcluster_size']}x{e_cfg['overcluster_size']} (torch nearest, floor "
            "index); mIoU over all classes (absent ones score 0); Acc = pixel accuracy, "
            "acc_ref = the HCL reference's \"Acc\" Σtp / Σ(tp + fp + fn); mean ± std over seeds"
            + "".join(f". Note: {n}" for n in notes))


def protocol_lines(config: Config, settings: dict[str, Any], checkpoint: str, train_store: FeatureStore,
                   val_store: FeatureStore, overcluster: str, rel) -> dict[str, Any]:
    """metrics.json's `protocol`: one line per part of the evaluation."""
    protocol, crf = protocol_of(config), crf_enabled(config)
    return {
        "name": protocol + (" (the reference's: probes trained online during training, docs/hp.md §8)"
                            if protocol == "paper" else " (probes fitted after training)"),
        "checkpoint": f"{rel(checkpoint)} (the last one; never chosen on validation labels)",
        "backbone": val_store.attrs["backbone"] + (" [random-init]" if train_store.random_init else ""),
        "val_resolution": f"{val_store.attrs['resolution']} px, labels at that size"
        + (f" ({val_store.attrs['geometry']['resize']})" if "resize" in val_store.attrs.get("geometry", {})
           else ""),  # HCL's store: the whole image, docs/hcl.md §5
        "val_images": len(val_store),
        "precision": precision_line(config, train_store),
        **probe_lines(settings),
        "crf": ("on and off (both reported): " + ", ".join(f"{k} {v}" for k, v in settings["crf"].items()
                                                           if k != "enabled")) if crf else "off",
        "overcluster": overcluster,
        "ignore": f"labels outside 0..{config['dataset']['n_classes'] - 1}",
    }


def precision_line(config: Config, train_store: FeatureStore) -> str:
    """What the numbers were computed in: the training step's autocast (train.amp resolved, pipeline/precision.py),
    the feature forward's dtype and the dtype the store holds."""
    from pipeline.precision import training_numerics

    forward = train_store.attrs.get("extraction", {}).get("dtype", "float32")
    return (f"training autocast {training_numerics(config['train'])} (train.amp = {config['train']['amp']}); "
            f"features: {forward} forward (features.amp = {config['features'].get('amp', 'auto')}), stored as "
            f"{train_store.array('feat').dtype}")


def result_rows(config: Config, log: Callable[[str], None], kinds: dict[str, str], val_store: FeatureStore,
                probe_outputs: dict[str, dict[str, Any]], keep: int) -> tuple[list[dict], dict, list[str]]:
    """(rows, the head's drawn predictions, notes): every feature kind's probes on val, and its overclustering."""
    method, protocol = config["train"]["method"], protocol_of(config)
    rows, predictions, notes = [], {}, []
    for kind, val_url in kinds.items():
        kind_store = FeatureStore.open(val_url)
        label = kind_label(kind, method, val_store)
        kind_rows, kind_pred = evaluate_kind(kind, kind_store, val_store, probe_outputs[kind], config, keep, label,
                                             protocol if kind == "head" else "kmeans")
        rows += kind_rows
        if config["evaluate"]["overcluster"]:
            rows.append(overcluster_row(kind, kind_store, val_store, config, label))
            note = rows[-1].pop("note")
            if note and note not in notes:  # said once, not once per feature kind (nor faiss's per k-means run)
                notes.append(note)
                log(note)
        if kind == "head":
            predictions = kind_pred
    rows.sort(key=lambda r: (r["features"] != "raw", r["probe"], r["crf"]))
    return rows, predictions, notes


# ---------------------------------------------------------------- a val split without labels
def cluster_outputs(config: Config, kinds: dict[str, str], val_store: FeatureStore,
                    probe_outputs: dict[str, dict[str, Any]], keep: int
                    ) -> tuple[ClusterTally | None, dict[tuple[str, bool], np.ndarray]]:
    """Without labels: the cluster probe's ids on every val image, nothing scored. Returns the head's tally
    (pixel share, images and example crops per cluster, from its cluster probe without CRF: what `predict` writes
    by default; None when the head has no cluster probe) and the first `keep` cluster maps per (feature kind,
    CRF)."""
    e_cfg, k = config["evaluate"], config["dataset"]["n_classes"]
    crf_states = [False, True] if crf_enabled(config) else [False]
    tally: ClusterTally | None = None
    kept: dict[tuple[str, bool], list[np.ndarray]] = {}
    for kind, url in kinds.items():
        if "centroids" not in probe_outputs[kind]:
            continue  # no cluster probe asked for (evaluate.probes = linear): nothing needs no labels
        store = FeatureStore.open(url)
        batches = val_predictions(store, val_store, {"centroids": probe_outputs[kind]["centroids"]}, k,
                                  e_cfg["batch_size"])
        for start, logits, _, images in tqdm(batches, total=-(-len(store) // e_cfg["batch_size"]),
                                             desc=f"clusters {kind}", leave=False):
            for crf in crf_states:
                pred = probe_labels(images, logits["cluster"], e_cfg, crf)
                if kind == "head" and not crf:
                    tally = tally or ClusterTally(logits["cluster"].shape[1])
                    tally.add(images, pred)
                if start < keep:
                    kept.setdefault((kind, crf), []).append(pred[:keep - start].astype(np.uint8))
    return tally, {key: np.concatenate(parts) for key, parts in kept.items()}
