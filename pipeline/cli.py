"""The `hp-pipe` command line: one sub-command per stage, plus status, config and bench.

Every option maps onto a config key (see `hp-pipe config --dataset X`); `--set section.key=value`
reaches any key that has no option of its own.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import Config, Preset, load_config, parse_sets
from pipeline.errors import UserError
from pipeline.methods.registry import method_of
from pipeline.methods.registry import names as method_names
from pipeline.orchestration import paths
from pipeline.orchestration.dask_client import set_tls_files
from pipeline.orchestration.locks import LockHeld
from pipeline.orchestration.runs import RunSettings
from pipeline.settings import FeatureDtype, Probe, ProbeSet, Renewal, Scheduler, TrainDevice
from pipeline.settings import Split as SplitChoice

HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 110, "terminal_width": 110}
app = typer.Typer(
    help=f"hp-pipe: unsupervised semantic segmentation from a frozen DINO feature cache; methods (--method): "
    f"{', '.join(method_names())}.\n\n"
    "Stages: prepare -> features -> train -> evaluate. Each skips itself when up to date and resumes when "
    "interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: wrapped, never cut with "…", no <bool> metavars on flags
    context_settings=HELP,
)
bench_app = typer.Typer(help="Benchmarks (figures as one JSON object on the last line with --json).",
                        no_args_is_help=True, rich_markup_mode=None, context_settings=HELP)
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        import pipeline

        print(f"hp-pipe {pipeline.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors (and the "
                                                                  "progress bars).")] = False,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also debug lines.")] = False) -> None:
    """hp-pipe: unsupervised semantic segmentation from a frozen DINO feature cache (every registered method)."""
    from pipeline.log import set_verbosity

    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose cannot be used together")
    set_verbosity("quiet" if quiet else "verbose" if verbose else "normal")


Dataset = Annotated[Preset, typer.Option("--dataset", "-d", help="Preset (pipeline/presets).")]
Workdir = Annotated[Path, typer.Option(help="Where stage outputs and manifests go.", envvar="HP_PIPE_WORKDIR")]
DataRoot = Annotated[str | None, typer.Option(help="Dataset folder (default: <workdir>/data/<dataset>).")]
Split = Annotated[SplitChoice, typer.Option(help="train, val or all.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override any config key: section.key=value "
                                                             "(repeat for several keys).")]
Force = Annotated[bool, typer.Option(help="Recompute even when up to date.")]
Backbone = Annotated[str | None, typer.Option(help="Any timm ViT with its pretrained tag: the DINO presets "
                                              "(vit_small_patch16_224.dino, ...), "
                                              "vit_small_patch14_reg4_dinov2.lvd142m, "
                                              "vit_small_patch16_dinov3.lvd1689m, ...")]
Weights = Annotated[
    str | None,
    typer.Option(help="'pretrained' (timm download), 'auto' (pretrained else random), or a checkpoint file."),
]
# the registered methods as a choice (pipeline/methods/registry.py): --help lists them, a typo is refused listing them
MethodName = StrEnum("MethodName", {name: name for name in method_names()})
BenchAmp = StrEnum("BenchAmp", {name: name for name in ("auto", "on", "off")})  # `bench train --amp`
Method = Annotated[MethodName | None, typer.Option(help=f"The method (train.method): {', '.join(method_names())}.")]
RunName = Annotated[str | None, typer.Option("--run", help="Run name (default: the method's name): the run directory "
                                             "is <workdir>/<dataset>/runs/<run>.")]
TrustWeights = Annotated[
    bool, typer.Option(help="Unpickle a --weights file fully, which can run code from it: only for files from a "
                            "source you trust (recorded in the manifest). Without it such a file is refused.")
]
TlsCa = Annotated[str | None, typer.Option("--tls-ca-file", help="CA certificate (PEM) for a tls:// scheduler "
                                          "(default: dask config distributed.comm.tls.ca-file).")]
TlsCert = Annotated[str | None, typer.Option("--tls-cert", help="This client's certificate (PEM) for a tls:// "
                                             "scheduler (default: distributed.comm.tls.client.cert).")]
TlsKey = Annotated[str | None, typer.Option("--tls-key", help="This client's private key (PEM) for a tls:// "
                                            "scheduler (default: distributed.comm.tls.client.key).")]
Clusters = Annotated[int | None, typer.Option(min=1, max=255, help="Clusters to find (dataset.n_classes): on a "
                                               "folder without labels, the segments' vocabulary (default 5).")]
RandomInit = Annotated[
    bool, typer.Option(help="Use a random-initialized backbone (testing only; said in every output).")
]


def executor():
    """pipeline/orchestration/graph.py `build`, with the functions of every stage: importing the stage modules
    registers them (the command line is their entry point; the library never imports them)."""
    import stages  # noqa: F401
    from pipeline.orchestration.graph import build

    return build


def build_config(
    dataset: str,
    data_root: str | None = None,
    sets: list[str] | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    random_init: bool = False,
    method: str | None = None,
    trust_weights: bool = False,
    options: dict[str, object] | None = None,
    **features: object,
) -> Config:
    """The preset, then --set pairs, then dedicated options (which win; `options`: "section.key": typed value)."""
    overrides = cli_overrides(data_root, sets, backbone, weights, random_init, method, trust_weights, options,
                              **features)
    config = load_config(dataset, overrides)
    _say_folder_settings(config, overrides)
    return config


def build_run_config(dataset: str, workdir: Path, run: str | None, data_root: str | None = None,
                     sets: list[str] | None = None, backbone: str | None = None, weights: str | None = None,
                     random_init: bool = False, method: str | None = None,
                     trust_weights: bool = False, options: dict[str, object] | None = None,
                     strict: bool = False) -> RunSettings:
    """For a command that reads a run (evaluate, predict, report, status): the preset, then the run's recorded
    training settings (runs/<run>/config.toml, pipeline/orchestration/runs.py), then the command line's explicit
    settings (`strict`, predict's: an explicit training setting other than the record's is refused)."""
    from pipeline.orchestration.runs import for_run

    overrides = cli_overrides(data_root, sets, backbone, weights, random_init, method, trust_weights, options)
    settings = for_run(dataset, overrides, workdir, run, strict)
    if settings.record is None:  # a recorded run has its folder settings already: never derived again over them
        _say_folder_settings(settings.config, overrides)
    if settings.note():
        print(f"[run] {settings.note()}", file=sys.stderr, flush=True)
    return settings


def cli_overrides(data_root: str | None = None, sets: list[str] | None = None, backbone: str | None = None,
                  weights: str | None = None, random_init: bool = False, method: str | None = None,
                  trust_weights: bool = False, options: dict[str, object] | None = None,
                  **features: object) -> dict[str, object]:
    """What the command line sets explicitly, as "section.key": value (--set pairs, then dedicated options, typed:
    `options` and `features` values that are None are not set)."""
    overrides: dict[str, object] = dict(parse_sets(sets))
    if method:
        overrides["train.method"] = method
    if data_root:
        overrides["dataset.root"] = data_root
    if backbone:
        overrides["features.backbone"] = backbone
    if weights and random_init:
        raise UserError("pass either --weights or --random-init, not both")
    if weights:
        overrides["features.weights"] = weights
    if random_init:
        overrides["features.weights"] = "random"
    if trust_weights:
        overrides["features.trust_weights"] = True
    overrides.update({f"features.{k}": v for k, v in features.items() if v is not None})
    overrides.update({k: v for k, v in (options or {}).items() if v is not None})
    return overrides


def _say_folder_settings(config: Config, overrides: dict[str, object]) -> None:
    from pipeline.datasets.folder import small_data_settings

    for line in small_data_settings(config, set(overrides)):  # a small `folder`: settings from its size, said once
        print(f"[folder] {line}", file=sys.stderr, flush=True)


@app.command()
def prepare(dataset: Dataset = "synthetic", workdir: Workdir = Path("work"), data_root: DataRoot = None,
            set_: Sets = None, force: Force = False) -> None:
    """Five-crop the training images and resize the validation images (docs/hp.md §7)."""
    build = executor()

    build(build_config(dataset, data_root, set_), workdir, "prepare", force=force)


@app.command()
def features(
    dataset: Dataset = "synthetic",
    split: Split = "all",
    workdir: Workdir = Path("work"),
    data_root: DataRoot = None,
    store: Annotated[str | None, typer.Option(help="Store URL: a path or any fsspec URL (one split).")] = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    trust_weights: TrustWeights = False,
    n_views: Annotated[int | None, typer.Option(help="Photometric views per training crop.")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Samples per chunk (= backbone batch).")] = None,
    scheduler: Annotated[Scheduler, typer.Option(help="Where chunks are computed.")] = Scheduler.local,
    address: Annotated[str | None, typer.Option(help="dask scheduler for --scheduler distributed: tls://HOST:PORT "
                                                "(with --tls-*), or tcp:// on a trusted network.")] = None,
    workers: Annotated[int, typer.Option(help="Workers for --scheduler local-cluster.")] = 2,
    tls_ca_file: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    method: Method = None,
    set_: Sets = None,
    force: Force = False,
) -> None:
    """Run the frozen backbone once per crop into a resumable zarr store (--method hcl: HCL's own stores, made from
    the source images with HCL's crops and views; HP's prepare and stores are not needed)."""
    build = executor()

    config = build_config(dataset, data_root, set_, backbone, weights, random_init, method, trust_weights,
                          n_views=n_views, chunk_size=chunk_size)
    splits = ["train", "val"] if split == "all" else [split]
    if store and len(splits) > 1:
        raise UserError("--store names one store: pass --split train or --split val with it")
    if scheduler == "distributed" and not address:
        raise UserError("--scheduler distributed needs --address tls://HOST:PORT (or tcp://) of a dask scheduler")
    set_tls_files(tls_ca_file, tls_cert, tls_key)
    prefix = method_of(config).store_prefix  # the configured method's stores (HCL's own)
    build(config, workdir, [f"features:{s}" for s in splits], force=force,
          stores={f"{prefix}{splits[0]}": store} if store else None,
          options={"scheduler": scheduler, "address": address, "workers": workers})


@app.command()
def verify(
    dataset: Dataset = "synthetic",
    split: Split = "all",
    workdir: Workdir = Path("work"),
    data_root: DataRoot = None,
    store: Annotated[str | None, typer.Option(help="Store URL: a path or any fsspec URL (any hp-pipe store, "
                                              "codes included).")] = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    n_views: Annotated[int | None, typer.Option(help="Photometric views per training crop.")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Samples per chunk (= backbone batch).")] = None,
    method: Method = None,
    threads: Annotated[int, typer.Option(help="Chunks read at a time.")] = 8,
    set_: Sets = None,
) -> None:
    """Read every chunk of the feature stores (the options of `features` locate them) and check its checksum and
    recorded digest. Exit 0 when all verify, 1 naming the bad chunks, which are recorded in the store so that the
    next `hp-pipe features` recomputes exactly them."""
    from stages import verify as stage

    config = build_config(dataset, data_root, set_, backbone, weights, random_init, method,
                          n_views=n_views, chunk_size=chunk_size)
    splits = ["train", "val"] if split == "all" else [split]
    where = method_of(config).store_url  # the configured method's stores (HCL's own)
    urls = [store] if store else [where(config, workdir, s) for s in splits]
    raise typer.Exit(stage.run(urls, paths.stage_dir(config, workdir), max(1, threads)))


@app.command()
def train(
    dataset: Dataset = "synthetic",
    run: RunName = None,
    method: Method = None,
    workdir: Workdir = Path("work"),
    data_root: DataRoot = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    trust_weights: TrustWeights = False,
    clusters: Clusters = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (hp.epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (hp.batch_size).")] = None,
    device: Annotated[TrainDevice | None, typer.Option(help="train.device.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its checkpoint "
                                              "(--no-resume starts it over).")] = True,
    set_: Sets = None,
    force: Force = False,
) -> None:
    """Train the configured method's head (--method: any registered method) from the feature cache (runs features
    and the method's own stages first when needed)."""
    build = executor()

    preset = load_config(dataset, cli_overrides(data_root, set_, backbone, weights, random_init, method, trust_weights))
    section = method_of(preset).section  # epochs and batch size are the method's own
    typed = {f"{section}.epochs": epochs, f"{section}.batch_size": batch_size, "train.device": device,
             "dataset.n_classes": clusters}
    config = build_config(dataset, data_root, set_, backbone, weights, random_init, method, trust_weights, typed)
    build(config, workdir, "train", run=run, force=force or not resume)


@app.command()
def evaluate(
    dataset: Dataset = "synthetic",
    run: RunName = None,
    method: Method = None,
    workdir: Workdir = Path("work"),
    data_root: DataRoot = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    trust_weights: TrustWeights = False,
    clusters: Clusters = None,
    probe: Annotated[ProbeSet | None, typer.Option(help="evaluate.probes: one probe, or all.")] = None,
    crf: Annotated[bool | None, typer.Option("--crf/--no-crf", help="Dense CRF on the val predictions.")] = None,
    tls_ca_file: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    set_: Sets = None,
    force: Force = False,
) -> None:
    """Cluster and linear probes (Hungarian mIoU/Acc, optional CRF) and overclustering, on the run's head and on
    raw features."""
    build = executor()

    # evaluate.crf holds "True"/"False" from --crf/--no-crf, as evaluations were always fingerprinted with
    typed = {"evaluate.probes": "cluster,linear" if probe == "all" else probe,
             "evaluate.crf": None if crf is None else str(crf), "dataset.n_classes": clusters}
    # the run's training settings come from its record: options given to train are never repeated
    settings = build_run_config(dataset, workdir, run, data_root, set_, backbone, weights, random_init, method,
                                trust_weights, typed)
    set_tls_files(tls_ca_file, tls_cert, tls_key)  # for evaluate.crf_address = tls://...
    build(settings.config, workdir, "evaluate", run=settings.run, force=force)


@app.command()
def predict(
    source: Annotated[Path, typer.Argument(help="An image or a folder of images (any size).")],
    dataset: Dataset = "synthetic",
    run: RunName = None,
    method: Method = None,
    workdir: Workdir = Path("work"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <run>/eval/predictions).")] = None,
    probe: Annotated[Probe, typer.Option(help="Which trained probe maps codes to classes.")] = Probe.cluster,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Dense CRF on each prediction.")] = False,
    data_root: DataRoot = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    trust_weights: TrustWeights = False,
    set_: Sets = None,
) -> None:
    """Segment new images: backbone (live) -> head -> probe; writes label PNGs, overlays, a contact sheet and
    legend.json. A run evaluated without labels segments into its clusters, numbered and coloured by the palette.

    Resize policy: the shorter side is resized to prepare.val_resolution (320 px by default), both
    sides are centre-cropped down to multiples of the patch size, and the prediction is upsampled
    back to the original image size. The run's recorded training settings win: a different explicit --data-root,
    --backbone or --weights is refused, naming both.
    """
    from stages import predict as stage

    settings = build_run_config(dataset, workdir, run, data_root, set_, backbone, weights, random_init, method,
                                trust_weights, strict=True)  # the backbone and geometry the run was trained with
    stage.run(settings.config, workdir, settings.run, source, out, probe, crf)


@app.command()
def segment(
    folder: Annotated[Path, typer.Argument(help="A folder of images (or <folder>/images, <folder>/train/images and "
                                           "<folder>/val/images); labels are optional.")],
    method: Method = None,
    run: RunName = None,
    workdir: Workdir = Path("work"),
    clusters: Clusters = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    trust_weights: TrustWeights = False,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Dense CRF on each image's segments.")] = False,
    set_: Sets = None,
    force: Force = False,
) -> None:
    """Segment a folder of your own images, no labels needed: prepare -> features -> train -> evaluate -> predict
    with the folder preset (dataset `folder`, settings derived from the folder's size), then says where the pictures
    are. Every step resumes and skips itself when done, like the commands it runs. Without labels each segment is a
    cluster (5 unless --clusters K), reported with its pixel share and example crops; with labels (in
    <folder>/labels) the evaluation is also scored."""
    from pipeline.datasets.folder import images_of
    build = executor()
    from stages import predict as stage

    root = folder.expanduser()
    if not root.is_dir():
        raise UserError(f"{folder} is not a folder: give the folder that holds your images")
    config = build_config("folder", str(root), set_, backbone, weights, random_init, method, trust_weights,
                          {"dataset.n_classes": clusters})
    evaluated = build(config, workdir, "evaluate", run=run, force=force)
    run_name = paths.run_name(run or method_of(config).name)
    images = list(dict.fromkeys(image for split in ("train", "val") for image in images_of(root, split)[1]))
    predicted = stage.run(config, workdir, run_name, images, None, "cluster", crf)
    eval_dir = paths.eval_dir(config, workdir, run_name)
    pictures = evaluated["outputs"].get("report", str(eval_dir / "report.md"))
    print(f"[segment] {len(images)} images -> {predicted['out']} (<image>.png labels, <image>_overlay.png, "
          f"contact_sheet.png); the evaluation: {pictures}"
          + (f", clusters: {eval_dir / 'clusters.png'}" if (eval_dir / "clusters.png").exists() else ""))


@app.command()
def report(
    dataset: Dataset = "synthetic",
    run: RunName = None,
    method: Method = None,
    workdir: Workdir = Path("work"),
    html: Annotated[bool, typer.Option("--html", help="Also write report.html: one self-contained page (pictures "
                                       "embedded, opens offline) with the settings, results, per-class IoU, "
                                       "curves and a grid of validation predictions.")] = False,
) -> None:
    """Write report.md (table + pictures) from the run's metrics.json; with --html also report.html."""
    import json

    from pipeline.reporting.report import write_report

    settings = build_run_config(dataset, workdir, run, method=method)
    config, run = settings.config, settings.run
    out = paths.eval_dir(config, workdir, run)
    path = out / "metrics.json"
    if not path.exists():
        raise UserError(f"no {path}: run `hp-pipe evaluate --dataset {dataset} --run {run}` first")
    metrics = json.loads(path.read_text())
    write_report(metrics, metrics.get("pictures", {}), out / "report.md")
    print(f"[report] {out / 'report.md'}")
    if html:
        from pipeline.orchestration.runner import read_manifest
        from pipeline.reporting.compare import compare_rows
        from pipeline.reporting.html_report import write_html_report

        trained = read_manifest(paths.stage_dir(config, workdir), f"train-{run}") or {}
        page = write_html_report(metrics, out, out / "report.html", workdir, trained.get("config"),
                                 compare_rows(paths.stage_dir(config, workdir)))
        print(f"[report] {page}")


@app.command()
def compare(dataset: Dataset = "synthetic", workdir: Workdir = Path("work")) -> None:
    """Every evaluated run of a dataset in one table (method, backbone, store dtype, protocol, cluster and linear
    mIoU/Acc beside the method's paper, training time and rate); also written as <workdir>/<dataset>/compare.md.
    Runs on a random-initialized backbone are marked in every row. Reads only."""
    from pipeline.files import atomic_write_text
    from pipeline.reporting.compare import compare_rows, to_markdown, to_text

    folder = paths.stage_dir(load_config(dataset), workdir)
    rows = compare_rows(folder)
    if not rows:
        raise UserError(f"no evaluated run in {folder / 'runs'}: run `hp-pipe evaluate --dataset {dataset} "
                        "--method M` first (any registered method)")
    print(to_text(rows))
    atomic_write_text(folder / "compare.md", to_markdown(rows, dataset))
    print(f"[compare] {folder / 'compare.md'}")


@app.command()
def status(dataset: Dataset = "synthetic", workdir: Workdir = Path("work"), data_root: DataRoot = None,
           backbone: Backbone = None, weights: Weights = None, random_init: RandomInit = False,
           trust_weights: TrustWeights = False, method: Method = None, set_: Sets = None,
           json_: Annotated[bool, typer.Option("--json", help="The states as a JSON list.")] = False) -> None:
    """Show each stage's state for a dataset: complete, incomplete (an output is gone), stale, running (with the
    runner holding its lock), interrupted, failed or missing; each run as its recorded settings say. Writes
    nothing."""
    from pipeline.datasets.synthetic import read_only

    with read_only():
        _status(dataset, workdir, data_root, backbone, weights, random_init, trust_weights, method, set_, json_)


def _status(dataset: str, workdir: Path, data_root: str | None, backbone: str | None, weights: str | None,
            random_init: bool, trust_weights: bool, method: str | None, set_: list[str] | None,
            as_json: bool = False) -> None:
    import json

    from pipeline.orchestration.runs import for_run

    # the dataset's stages as the default run (named after the method) recorded them, the command line on top
    overrides = cli_overrides(data_root, set_, backbone, weights, random_init, method, trust_weights)
    config = for_run(dataset, overrides, workdir, None).config
    sdir = paths.stage_dir(config, workdir)
    from pipeline.methods.registry import methods

    stores = {m.store_prefix + split: _recorded_store(sdir, stage) for m in methods().values()
              for split, stage in m.stores.items()}  # each method's stores where its features stages put them
    run_overrides = cli_overrides(data_root, set_, backbone, weights, random_init, None, trust_weights)
    planner = _StatusPlans(dataset, workdir, config, stores, run_overrides)
    if not as_json:
        print(f"{'stage':18} {'state':12} {'finished':26} {'seconds':>8}  outputs")
    report = [_status_row(sdir, step, subs, as_json) for step, subs in _status_steps(config, sdir, planner)]
    if as_json:
        print(json.dumps(report, indent=2))


class _StatusPlans:
    """The plans `status` reads, made from pipeline/orchestration/graph.py `plan` (one dataset listing per dataset):
    the dataset's
    stages as the command line says, each run's as its recorded settings say."""

    def __init__(self, dataset: str, workdir: Path, config: Config, stores: dict[str, str | None],
                 overrides: dict[str, object]) -> None:
        self.dataset, self.workdir, self.config, self.overrides = dataset, workdir, config, overrides
        self.stores = {k: v for k, v in stores.items() if v}
        self.memo: dict[str, object] = {}

    def of(self, config: Config, run: str | None = None) -> dict:
        from pipeline.orchestration.graph import plan

        return plan(config, self.workdir, runs=[run] if run else [], stores=self.stores, memo=self.memo)

    def run(self, run: str) -> dict:
        """Run `run`'s steps from its recorded settings (its own method, whatever --method says); a run without a
        record: the command line's settings, in the method its train manifest names."""
        import copy

        from pipeline.methods.registry import names
        from pipeline.orchestration.runner import read_manifest
        from pipeline.orchestration.runs import for_run

        settings = for_run(self.dataset, self.overrides, self.workdir, run)
        if settings.record:
            return self.of(settings.config, run)
        train = read_manifest(paths.stage_dir(self.config, self.workdir), f"train-{run}") or {}
        config = copy.deepcopy(self.config)
        recorded = train.get("config", {}).get("train", {}).get("method")
        config["train"]["method"] = recorded if recorded in names() else self.config["train"]["method"]
        return self.of(config, run)


def _status_steps(config: Config, sdir: Path, planner: _StatusPlans) -> list[tuple]:
    """(step, its sub-steps) for every stage `status` lists: the dataset's stages the configured method reads (and
    any other method's that were built), then train and evaluate per run (evaluate with its codes and probes)."""
    import copy

    from pipeline.methods.registry import methods
    from pipeline.orchestration.graph import method_stages, stages_of
    from pipeline.orchestration.runner import read_manifest

    method, steps, out, listed = method_of(config), planner.of(config), [], set()
    needed = _dataset_stages_read(stages_of(config))
    for other in [method, *(m for m in methods().values() if m is not method)]:
        graph = method_stages(other)
        other_steps = steps if other is method else None
        for name, stage in graph.items():
            if stage.level != "dataset" or name in listed:
                continue
            if not (other is method and name in needed) and read_manifest(sdir, name) is None:
                continue  # a store the method does not read: shown once built
            if other_steps is None:
                other_config = copy.deepcopy(config)
                other_config["train"]["method"] = other.name
                other_steps = planner.of(other_config)
            out.append((other_steps[name], []))
            listed.add(name)
    for name, stage in stages_of(config).items():
        if stage.level == "run":
            runs = sorted(p.stem for p in (sdir / "stages").glob(f"{name}-*.json")) or [f"{name}-{method.name}"]
            for manifest_name in runs:
                run_steps = planner.run(manifest_name.removeprefix(f"{name}-"))
                step = run_steps[manifest_name]
                out.append((step, [run_steps[up] for up in step.upstream if run_steps[up].run and
                                   stages_of(config).get(run_steps[up].stage, stage).level == "sub"]))
    return out


def _dataset_stages_read(stages: dict) -> set[str]:
    """The dataset-level stages a method's runs read, directly or through others."""
    seen: set[str] = set()
    todo = [up for stage in stages.values() if stage.level != "dataset" for up in (*stage.inputs, *stage.after)]
    while todo:
        name = todo.pop()
        if name in stages and stages[name].level == "dataset" and name not in seen:
            seen.add(name)
            todo += [*stages[name].inputs, *stages[name].after]
    return seen


def _status_row(sdir: Path, step, subs: list, as_json: bool) -> dict[str, object]:
    """One stage's row (printed unless `as_json`): its state, when it finished, where its output is; its sub-stages'
    states (evaluate's codes and probes)."""
    from cache.writer import store_problems
    from pipeline.orchestration.runner import missing_outputs, read_manifest, runner_of, stage_state

    name = step.name
    manifest = read_manifest(sdir, name) or {}
    state = stage_state(sdir, name, step.config, step.inputs)
    outputs = manifest.get("outputs", {})
    where = (outputs.get("metrics") or outputs.get("run_dir") or outputs.get("store") or outputs.get("dir")
             or (outputs.get("train", {}) or {}).get("dir", ""))
    missing = missing_outputs(manifest) if state == "incomplete" else []
    if state == "complete" and name.startswith("features-") and outputs.get("store"):
        missing = store_problems(outputs["store"])  # the cheap check features runs before "up to date"
        state = "incomplete" if missing else state
    seconds = manifest.get("timings", {}).get("seconds", "")
    runner = runner_of(sdir, name) if state == "running" else None
    steps = [{"stage": sub.name, "state": stage_state(sdir, sub.name, sub.config, sub.inputs)} for sub in subs]
    row = {"stage": name, "state": state, "finished": manifest.get("finished"), "seconds": seconds or None,
           "output": where or None, "missing": missing, "random_init": bool(outputs.get("random_init")),
           "runner": runner, "steps": steps}
    if not as_json:
        flag = " [random-init]" if outputs.get("random_init") else ""
        note = (f"  missing: {', '.join(missing)}" if missing else "") + (f"  by {runner}" if runner else "")
        note += "  (" + ", ".join(f"{sub['stage']} {sub['state']}" for sub in steps) + ")" if steps else ""
        print(f"{name:18} {state:12} {manifest.get('finished', ''):26} {seconds!s:>8}  {where}{flag}{note}")
    return row


def _recorded_store(sdir: Path, stage: str) -> str | None:
    from pipeline.orchestration.runner import read_manifest

    manifest = read_manifest(sdir, stage) or {}
    return manifest.get("config", {}).get("store")


@app.command("config")
def show_config(dataset: Dataset = "synthetic", set_: Sets = None) -> None:
    """Print the resolved config (preset + overrides) as TOML that can be pasted into a preset."""
    from pipeline.config import to_toml

    print(to_toml(build_config(dataset, None, set_)), end="")


@bench_app.command("features")
def bench_features(
    images: Annotated[int, typer.Option(help="Crops to process.")] = 32,
    resolution: Annotated[int, typer.Option(help="Crop size in pixels.")] = 224,
    backbone: Backbone = "vit_small_patch16_224.dino",
    weights: Weights = "auto",
    n_views: Annotated[int, typer.Option(help="Photometric views per crop.")] = 2,
    chunk_size: Annotated[int, typer.Option(help="Samples per chunk.")] = 8,
    repeats: Annotated[int, typer.Option(help="Side-by-side repetitions (median reported).")] = 3,
    workdir: Workdir = Path("work"),
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Whole features stage (decode -> backbone -> store) vs the bare backbone forward, in one run."""
    from benches import features as bench

    bench.features(images, resolution, backbone, weights, n_views, chunk_size, repeats, workdir, json_)


@bench_app.command("train")
def bench_train(
    images: Annotated[int, typer.Option(help="Training crops in the bench cache (HP), source images (HCL).")] = 40,
    resolution: Annotated[int, typer.Option(help="Crop size in pixels.")] = 224,
    backbone: Backbone = "vit_small_patch16_224.dino",
    weights: Weights = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per iteration.")] = 4,
    iterations: Annotated[int, typer.Option(help="Iterations timed per side.")] = 10,
    pool_size: Annotated[int, typer.Option(help="Reference pool size.")] = 32,
    renew_interval: Annotated[int, typer.Option(help="Iterations between Pool_sp renewals.")] = 5,
    repeats: Annotated[int, typer.Option(help="Side-by-side repetitions (median reported).")] = 3,
    method: Annotated[MethodName, typer.Option(help="The method whose training is timed.")] = "hp",
    amp: Annotated[BenchAmp, typer.Option(help="The cache side's autocast: auto (bf16 where the CPU has native "
                                               "bf16), on, off. The reference's side runs fp32, as on a CPU.")
                   ] = BenchAmp.auto,
    workdir: Workdir = Path("work"),
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Training from the cache vs the reference's backbone-every-step iteration (HP: also renewal, lookup, loss
    memory, the iteration's parts; HCL: also the MoGoClustering pass)."""
    from benches import train_bench

    train_bench(str(getattr(method, "value", method)), amp.value)(
        images, resolution, backbone, weights, batch_size, iterations, pool_size, renew_interval, repeats, workdir,
        json_)


@bench_app.command("all")
def bench_all(
    workdir: Workdir = Path("work"),
    only: Annotated[str | None, typer.Option(help="Comma-separated benches to run (default all): features, train-hp, "
                                                  "train-hp-preset, train-hp-preset-fp32, train-hcl, train-stego, "
                                                  "scale, evaluate.")] = None,
    write: Annotated[Path | None, typer.Option(help="Also write the table into this Markdown file (its generated "
                                                    "section), e.g. docs/results.md.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on the last line.")] = False,
) -> None:
    """Every speed bench at its defaults, each in a fresh process, then one table: figure, value, spread, floor,
    whether it is met, what it was measured against, and the machine."""
    from benches.all import bench_all as run_all

    run_all(workdir, [n.strip() for n in only.split(",") if n.strip()] if only else None, write, json_)


@bench_app.command("precision")
def bench_precision(
    iterations: Annotated[int, typer.Option(help="Iterations of the synthetic run.")] = 200,
    planted_seeds: Annotated[int, typer.Option(help="Seeds of the planted HP bench run in each precision "
                                                    "(0: none).")] = 1,
    workdir: Workdir = Path("work"),
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """The same HP runs in bf16 autocast and in fp32: loss curves (and their picture), cluster mIoU, the planted
    bench's head mIoU."""
    from benches.precision import precision

    if iterations < 1 or planted_seeds < 0:
        raise UserError("--iterations must be at least 1 and --planted-seeds at least 0")
    precision(workdir, iterations, planted_seeds, json_)


@bench_app.command("scale")
def bench_scale(
    sizes: Annotated[str, typer.Option(help="Store sizes in crops, comma-separated (a first run writes the 500k "
                                            "store: hard-linked chunks, minutes).")] = "2000,20000,50000,500000",
    iterations: Annotated[int, typer.Option(help="Training iterations timed per size.")] = 40,
    batch_size: Annotated[int, typer.Option(help="Crops per iteration.")] = 16,
    head_dim: Annotated[int, typer.Option(help="D, the head's width.")] = 256,
    pool_size: Annotated[int, typer.Option(help="Reference pool size.")] = 2048,
    renew_interval: Annotated[int, typer.Option(help="Iterations between Pool_sp renewals.")] = 20,
    chunk_size: Annotated[int, typer.Option(help="Samples per chunk.")] = 16,
    resolution: Annotated[int, typer.Option(help="Crop size in pixels (grid = resolution / patch).")] = 224,
    patch: Annotated[int, typer.Option(help="Patch size of the (simulated) backbone.")] = 16,
    dim: Annotated[int, typer.Option(help="Feature channels C.")] = 384,
    dtype: Annotated[FeatureDtype, typer.Option(help="Stored features.")] = FeatureDtype.float16,
    unique_chunks: Annotated[int, typer.Option(help="Chunks of their own per store; the rest hard links.")] = 128,
    renewal: Annotated[Renewal, typer.Option(help="chunks (hp-pipe) or gather (the old way, to compare).")
                       ] = Renewal.chunks,
    repeats: Annotated[int, typer.Option(help="Renewals timed per size (median reported).")] = 5,
    workdir: Workdir = Path("work"),
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Training iterations/s, Pool_sp renewal time and peak RSS from random-feature stores of growing size (each in
    a fresh process), and the reader's crops/s and MB/s with 1 and 2 decoding threads."""
    from benches import scale as stage

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sizes must be comma-separated crop counts, e.g. 2000,20000,50000; got '{sizes}'") from None
    if not size_list or min(size_list) < batch_size:
        raise UserError(f"--sizes: every store needs at least one batch of {batch_size} crops; got '{sizes}'")
    stage.scale(size_list, workdir, iterations, batch_size, head_dim, pool_size, renew_interval, chunk_size,
                resolution, patch, dim, 2, dtype, unique_chunks, repeats, renewal, as_json=json_)


@bench_app.command("quality")
def bench_quality(
    dataset: Dataset = "synthetic",
    workdir: Workdir = Path("work"),
    data_root: DataRoot = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    trust_weights: TrustWeights = False,
    set_: Sets = None,
    planted: Annotated[bool, typer.Option("--planted", help="Planted features with a known answer (no backbone): "
                                               "the head vs raw features vs a deliberately broken run.")] = False,
    seeds: Annotated[int, typer.Option(help="With --planted: seeds (planted data and training), each printed.")] = 3,
    method: Annotated[MethodName, typer.Option(
        help="With --planted: the method whose planted bench runs (raw features, its head at the start and end "
             "of training, a deliberately broken run).")] = "hp",
    style: Annotated[float | None, typer.Option(help="With --planted: a control run with another image-style "
                                                     "strength (the bench's generator keeps 1.1; 0: no style).")
                     ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Raw backbone features vs the trained HP and HCL heads on the same cache: cluster probe and overclustering.
    With --planted: HP (or HCL) vs raw features on planted features (README, "Quality with a known answer")."""
    if planted:
        from benches import planted as bench_planted

        run, bench = bench_planted.planted_bench(str(getattr(method, "value", method)))
        run(seeds, workdir, json_, bench_planted.with_style(bench, style))
        return
    from benches import train as bench_train

    config = build_config(dataset, data_root, set_, backbone, weights, random_init, trust_weights=trust_weights)
    bench_train.quality(config, workdir, json_)


@bench_app.command("evaluate")
def bench_evaluate(
    dataset: Dataset = "synthetic",
    run: Annotated[str, typer.Option(help="The run to evaluate (trained first when needed).")] = "hp",
    workdir: Workdir = Path("work"),
    crf_images: Annotated[int, typer.Option(help="Images for the CRF serial/parallel timing.")] = 6,
    crf_size: Annotated[int, typer.Option(help="Their size in pixels (27 classes).")] = 320,
    workers: Annotated[int, typer.Option(help="CRF processes on the parallel side.")] = 2,
    set_: Sets = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on the last line.")] = False,
) -> None:
    """Dense CRF images/s serial vs parallel, and the evaluate stages' time split by step (CRF on)."""
    from benches import train as bench_train

    bench_train.evaluate(build_config(dataset, None, set_), workdir, run, crf_images, crf_size, workers, json_)


def main() -> None:
    """Entry point: user errors print one line and exit 2; runtime failures (a stage or store locked by another
    runner, disk full, other OS errors) one line and exit 1; Ctrl-C keeps finished work, exit 130."""
    interrupted = "\ninterrupted: finished work is kept; rerun the same command to resume"
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except LockHeld as exc:  # another live runner: not bad input, and nothing was written
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C inside a command into exit 130 before it reaches us
            print(interrupted, file=sys.stderr)
        raise
    except OSError as exc:  # a runtime failure of the machine, not of the input: exit 1, still one line
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        sys.exit(1)


def os_error_message(exc: OSError) -> str:
    """Disk full and other OS errors as one line naming the path; finished work is kept either way."""
    import errno
    import shutil

    where = exc.filename or "(unknown path)"
    if exc.errno == errno.ENOSPC:
        free = ""
        folder = Path(str(where)).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free = f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free there)"
        except OSError:
            pass
        return (f"no space left on the device while writing {where}{free}; free some space and rerun the same "
                "command: finished work is kept and the stage resumes")
    return f"{exc.strerror or exc} ({where}); finished work is kept: fix the cause and rerun the same command"


if __name__ == "__main__":
    main()
