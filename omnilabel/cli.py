"""The ``omnilabel`` command line: parses, validates flags, calls one library function per command.

No logic lives here. Library errors (``OmnilabelError``) become one readable line on stderr and a
non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from omnilabel import __version__
from omnilabel.errors import InputError, OmnilabelError

app = typer.Typer(
    name="omnilabel",
    help=(
        "Turn weak annotations (image-level tags, one point per object, boxes) into COCO instance "
        "pseudomasks, and train and evaluate the model that learns from them.\n\n"
        "Input and output are COCO JSON. Run `omnilabel COMMAND --help` for each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console(stderr=True)
out = Console()

_state: dict[str, Any] = {"debug": False}


class SplitWeakOpt(str, Enum):
    tags = "tags"
    points = "points"
    boxes = "boxes"
    mixed = "mixed"
    mixed_images = "mixed-images"


def _version(value: bool) -> None:
    if value:
        out.print(f"omnilabel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def _default_output(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(".json") + suffix)


# -- data ------------------------------------------------------------------------------------------


@app.command()
def split(
    coco: Annotated[Path, typer.Argument(help="A fully annotated COCO JSON (instance masks).")],
    fully: Annotated[float, typer.Option(help="Fraction of images that keep their full masks (0..1).")] = 0.1,
    weak: Annotated[SplitWeakOpt, typer.Option(
        help="Weak type for every other annotation: `tags` (class only), `points` (one click inside the "
             "mask), `boxes` (the mask's box), `mixed` (a random type per annotation), `mixed-images` (a random "
             "type per image).")] = SplitWeakOpt.points,
    seed: Annotated[int, typer.Option(help="Random seed: same input and seed give the same bytes.")] = 0,
    output: Annotated[Path | None, typer.Option("-o", "--output",
                                                help="Output COCO JSON [default: COCO.weak.json beside it].")]
    = None,
) -> None:
    """Simulate a weakly annotated dataset from a fully annotated one.

    Keeps masks on a seeded fraction of the images and turns every other annotation into the weak type.
    Image and annotation ids are kept, so pseudomasks made later can be scored against the masks they
    came from (`omnilabel evaluate`).
    """
    from omnilabel.data.coco import load_coco, write_coco
    from omnilabel.data.weak import split_coco, summarize_weak

    data = load_coco(coco, allow_outside_images=True)
    result = split_coco(data, fully=fully, weak=weak.value, seed=seed)
    target = output or _default_output(coco, ".weak.json")
    write_coco(result, target)
    counts = summarize_weak(result)
    out.print(f"wrote {target}")
    table = Table(title="annotations by weak type")
    table.add_column("weak type")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def validate(
    coco: Annotated[Path, typer.Argument(help="A COCO JSON (full or weak annotations).")],
    images: Annotated[Path | None, typer.Option(
        help="Folder the images' `file_name`s are relative to [default: the JSON's folder].")] = None,
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of --images.")] = False,
) -> None:
    """Check a COCO file and open every image it names.

    Reports every problem at once, each naming the file, the record and the field. Jobs do not open
    images up front (a missing image is recorded and the job goes on); run this to check them first.
    """
    from omnilabel.data.coco import check_image_files, load_coco
    from omnilabel.data.weak import summarize_weak

    images_dir = images or coco.parent
    data = load_coco(coco, images_dir=images_dir, allow_outside_images=allow_outside_images)
    problems = check_image_files(data, images_dir, allow_outside_images=allow_outside_images)
    if problems:
        raise InputError(f"{coco}: {len(problems)} image problem(s)", problems)
    counts = ", ".join(f"{k} {v}" for k, v in summarize_weak(data).items())
    out.print(f"{coco}: OK — {len(data['images'])} images, {len(data['annotations'])} annotations ({counts})")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write `images/` and `coco.json` into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    max_objects: Annotated[int, typer.Option(help="Most shapes per image.")] = 5,
) -> None:
    """Write a synthetic, fully annotated dataset of textured shapes (for trying omnilabel out)."""
    from omnilabel.data.synthetic import make_dataset

    if n < 1 or size < 16:
        raise InputError(f"synth: --n must be ≥ 1 and --size ≥ 16 (got {n}, {size})")
    path = make_dataset(out_dir, n_images=n, seed=seed, size_hw=(size, size), max_objects=max_objects)
    out.print(f"wrote {n} images and {path}")


# -- teacher ---------------------------------------------------------------------------------------


class WeakOpt(str, Enum):
    auto = "auto"
    none = "none"
    tags = "tags"
    points = "points"
    boxes = "boxes"


@app.command()
def pseudomask(
    coco: Annotated[Path, typer.Argument(help="Weak COCO JSON (tags, points, boxes; full masks pass through).")],
    weak: Annotated[WeakOpt, typer.Option(
        help="Which weak labels to use: `auto` (each annotation by what it carries), `points`, `boxes`, "
             "`tags` (classes only), or `none` (ignore labels; detect every dataset class).")] = WeakOpt.auto,
    images: Annotated[Path | None, typer.Option(help="Image folder [default: the JSON's folder].")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Pseudomask COCO JSON [default: COCO.pseudo.json beside the input].")] = None,
    sam: Annotated[str | None, typer.Option(
        help="SAM checkpoint: vit_b, vit_l, vit_h or a path [default: the base a --teacher was fine-tuned "
             "from, else vit_h].")] = None,
    detector: Annotated[str, typer.Option(
        help="Grounding DINO: grounding-dino-tiny, grounding-dino-base, a local folder, or `none` (points then "
             "use SAM's own box; tags/none need a detector).")] = "grounding-dino-tiny",
    teacher: Annotated[Path | None, typer.Option(
        help="Fine-tuned teacher file (`omnilabel finetune-teacher`) used for every SAM stage.")] = None,
    teacher_refine: Annotated[Path | None, typer.Option(
        help="Teacher file for stage 2 of the points setting (BP-SAM), overriding --teacher there; the "
             "paper's pair is `--teacher p_sam.pt --teacher-refine bp_sam.pt`.")] = None,
    clip: Annotated[str | None, typer.Option(
        help="CLIP for class-aware teachers, a name or a path [default: the one the teacher was trained "
             "with]; loaded only when a teacher has a class module.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, …")] = "cpu",
    box_threshold: Annotated[float, typer.Option(help="GDino confidence kept for tags/none (paper: 0.3).")] = 0.3,
    nms_iou: Annotated[float, typer.Option(help="GDino NMS IoU threshold (paper: 0.9).")] = 0.9,
    job_dir: Annotated[Path | None, typer.Option(
        help="Resumable job state [default: OUTPUT.job]; a rerun skips finished shards.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Restart a job directory that holds a different job.")] = False,
    batch_size: Annotated[int, typer.Option(
        help="Images per batch: the unit a worker takes at a time, and of resume.")] = 16,
    num_workers: Annotated[int | None, typer.Option(
        help="Ray workers, each loading the models once [default: one per GPU with --device cuda, else 1]; "
             "0 runs in this process without Ray.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (`auto`, `ray://host:10001`) [default: a local Ray started here].")] = None,
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of --images.")] = False,
) -> None:
    """Turn weak annotations into COCO pseudomasks with SAM and Grounding DINO.

    Boxes prompt SAM directly; points go SAM → Grounding DINO refinement (Algorithm 1) → SAM with box and
    point; tags (and unlabelled images) go Grounding DINO with the image's classes → SAM. Annotations with
    a `segmentation` pass through untouched. Each image is encoded by SAM once.
    """
    from omnilabel.jobs.progress import progress_bar, summary_tables
    from omnilabel.jobs.pseudomask import ray_shards, run_pseudomask
    from omnilabel.jobs.ray_runner import ray_options
    from omnilabel.teachers.loading import TeacherSpec, default_sam
    from omnilabel.teachers.pipeline import PipelineConfig

    target = output or _default_output(coco, ".pseudo.json")
    teacher_path = str(teacher) if teacher is not None else None
    spec = TeacherSpec(sam=sam or default_sam(teacher_path), detector=detector, device=device,
                       box_threshold=box_threshold, nms_iou=nms_iou, teacher=teacher_path,
                       teacher_refine=str(teacher_refine) if teacher_refine is not None else None, clip=clip)
    config = PipelineConfig(weak=weak.value, box_threshold=box_threshold)
    options = ray_options(num_workers, address=address, device=device)
    run_shards = ray_shards(options) if options is not None else None
    with progress_bar("pseudomask", console) as on_progress:
        summary = run_pseudomask(coco, output=target, images_dir=images, spec=spec, config=config, job_dir=job_dir,
                                 overwrite=overwrite, shard_size=batch_size, allow_outside_images=allow_outside_images,
                                 on_progress=on_progress, run_shards=run_shards)
    for table in summary_tables(summary):
        out.print(table)
    if summary["left_out"]:
        console.print(f"[yellow]warning:[/] {summary['left_out']} image(s) with image-level tags or no labels "
                      "need a detector and were left out of the output (drop `--detector none` to label them)")


@app.command("finetune-teacher")
def finetune_teacher(
    coco: Annotated[Path, typer.Argument(
        help="COCO JSON; its annotations with a `segmentation` (the fully annotated images) are trained on.")],
    prompts: Annotated[str, typer.Option(
        help="Prompts drawn from each GT mask: `points` (P-SAM: one random point inside), `boxes` (box-SAM: "
             "the mask's box), `points+boxes` (BP-SAM: point, box or both).")] = "points+boxes",
    images: Annotated[Path | None, typer.Option(help="Image folder [default: the JSON's folder].")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Teacher file [default: COCO.teacher.pt beside the input].")] = None,
    sam: Annotated[str, typer.Option(help="Base SAM: vit_b, vit_l, vit_h or a checkpoint path.")] = "vit_h",
    class_aware: Annotated[bool, typer.Option(
        "--class-aware", help="Also train the ControlNet-style class prompt (CLIP text of each class).")] = False,
    clip: Annotated[str, typer.Option(help="CLIP for --class-aware: a name or a checkpoint path.")] = "clip-vit-b-32",
    clip_arch: Annotated[str | None, typer.Option(
        help="open_clip architecture of a --clip path (e.g. ViT-B-32) [default: the registry's].")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps (paper: 36,874).")] = 36_874,
    lr_drop_step: Annotated[int | None, typer.Option(
        help="Step at which the lr drops 10x [default: 75% of --steps; paper: 27,655].")] = None,
    batch_size: Annotated[int, typer.Option(help="Instances per step over all workers (paper: 32).")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 1e-5).")] = 1e-5,
    seed: Annotated[int, typer.Option(help="Seed of data order, prompts and point sampling.")] = 0,
    train_encoder: Annotated[bool, typer.Option(
        "--train-encoder", help="Also train the image encoder (small teachers from scratch; no embedding "
                                "cache; the file then holds the encoder).")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.")] = 1000,
    run_dir: Annotated[Path | None, typer.Option(
        help="Checkpoints, embedding cache and loss log [default: OUTPUT.run].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start the run in --run-dir again.")] = False,
    num_workers: Annotated[int, typer.Option(
        help="0: train in this process; N: N DDP workers on Ray Train (one GPU each with --device cuda).")] = 0,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (`auto`, `ray://host:10001`) [default: a local Ray started here].")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, …")] = "cpu",
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of --images.")] = False,
) -> None:
    """Fine-tune SAM's prompt encoder and mask decoder on the fully annotated images: a teacher for pseudomask.

    The image encoder stays frozen and each image is encoded once for the whole run. Loss 5·CE + 5·Dice on
    12,544 uncertainty-sampled points per mask, AdamW, lr 1e-5 → 1e-6 at 75% of the steps. The teacher file
    holds only what was trained and names its base SAM; use it with `omnilabel pseudomask --teacher`.
    """
    from omnilabel.jobs.train_teacher import run_finetune_teacher, training_progress
    from omnilabel.teachers.finetune import FinetuneConfig
    from omnilabel.teachers.finetune_data import parse_prompt_mode

    config = FinetuneConfig(prompts=parse_prompt_mode(prompts), class_aware=class_aware, steps=steps,
                            lr_drop_step=lr_drop_step, batch_size=batch_size, lr=lr, seed=seed,
                            train_encoder=train_encoder, checkpoint_every=checkpoint_every)
    target = output or _default_output(coco, ".teacher.pt")
    with training_progress(console) as on_log:
        summary = run_finetune_teacher(coco, output=target, config=config, images_dir=images, sam=sam, clip=clip,
                                       clip_arch=clip_arch, run_dir=run_dir, resume=resume, overwrite=overwrite,
                                       num_workers=num_workers, address=address, device=device,
                                       allow_outside_images=allow_outside_images, on_log=on_log)
    table = Table(title=f"wrote {summary['output']} ({summary['size_mb']} MB)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("images / instances trained on", f"{summary['images']} / {summary['instances']}")
    table.add_row("steps (resumed from)", f"{summary['steps']} ({summary['start_step']})")
    if summary["last"]:
        table.add_row("last loss", f"{summary['last']['loss']:.4f}")
    table.add_row("run directory", summary["run_dir"])
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    out.print(table)

#: Defaults of `weights init-sam`: the architecture of the example teacher (examples/teacher/train.sh).
_ARCH = {"embed_dim": 128, "depth": 4, "num_heads": 4, "global_attn": "1,3", "window_size": 8,
         "patch_size": 8, "image_size": 128, "prompt_dim": 128}


@app.command()
def weights(
    action: Annotated[str, typer.Argument(help="`list`, `download NAME`, `path NAME` or `init-sam FILE.pth`.")],
    name: Annotated[str | None, typer.Argument(
        help="A weight name from `omnilabel weights list` (init-sam: the file to write).")] = None,
    force: Annotated[bool, typer.Option(help="With download: fetch again even if cached.")] = False,
    embed_dim: Annotated[int, typer.Option(help="init-sam: ViT width.")] = _ARCH["embed_dim"],
    depth: Annotated[int, typer.Option(help="init-sam: ViT blocks.")] = _ARCH["depth"],
    num_heads: Annotated[int, typer.Option(help="init-sam: attention heads.")] = _ARCH["num_heads"],
    global_attn: Annotated[str, typer.Option(
        help="init-sam: comma-separated blocks with global attention (the others use windows).")] = _ARCH[
        "global_attn"],
    window_size: Annotated[int, typer.Option(help="init-sam: attention window side in patches.")] = _ARCH[
        "window_size"],
    patch_size: Annotated[int, typer.Option(help="init-sam: patch side in pixels.")] = _ARCH["patch_size"],
    image_size: Annotated[int, typer.Option(help="init-sam: input side in pixels.")] = _ARCH["image_size"],
    prompt_dim: Annotated[int, typer.Option(
        help="init-sam: width of the prompt encoder and mask decoder (256 in Meta's SAMs).")] = _ARCH["prompt_dim"],
    seed: Annotated[int, typer.Option(help="init-sam: seed of the random weights.")] = 0,
) -> None:
    """List, download or locate the model weights omnilabel uses; or write a new, untrained SAM.

    Weights live in `$OMNILABEL_CACHE` (default `~/.cache/omnilabel`). Set `OMNILABEL_OFFLINE=1` to forbid
    downloads; a missing file then fails with the path to put it at.

    `init-sam FILE.pth` writes a randomly initialised SAM of the architecture the `--embed-dim` … flags give
    (default: the example teacher's, 2.6 M parameters at 128 px), to train from scratch with
    `omnilabel finetune-teacher --sam FILE.pth --train-encoder` (examples/teacher/train.sh is the example
    teacher's recipe).
    """
    from omnilabel.models.registry import REGISTRY, cache_dir, download, is_cached, list_weights, weight_path

    if action == "init-sam":
        from omnilabel.models.sam_loader import SamArch, init_sam_checkpoint

        if name is None:
            raise InputError("weights init-sam: give the file to write, e.g. `omnilabel weights init-sam sam.pth`")
        try:
            globals_ = tuple(int(v) for v in global_attn.split(",") if v.strip())
        except ValueError as e:
            raise InputError(f"--global-attn: expected comma-separated block numbers, got {global_attn!r}") from e
        arch = SamArch(embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_attn_indexes=globals_,
                       window_size=window_size if len(globals_) < depth else 0, patch_size=patch_size,
                       image_size=image_size, out_chans=prompt_dim)
        path = init_sam_checkpoint(arch, name, seed=seed)
        out.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, untrained)")
        return
    if action == "list":
        table = Table(title=f"weights (cache: {cache_dir()})")
        for col in ("name", "kind", "cached", "description"):
            table.add_column(col)
        for spec in list_weights():
            table.add_row(spec.name, spec.kind, "yes" if is_cached(spec.name) else "no", spec.description)
        out.print(table)
        return
    if action not in ("download", "path"):
        raise InputError(f"weights: unknown action {action!r}; use list, download NAME or path NAME")
    if name is None or name not in REGISTRY:
        raise InputError(f"weights {action}: give one of: {', '.join(REGISTRY)}")
    if action == "download":
        out.print(str(download(name, force=force)))
    else:
        out.print(str(weight_path(name)))


# -- student ---------------------------------------------------------------------------------------


class PresetOpt(str, Enum):
    paper = "paper"
    tiny = "tiny"


@app.command("train-student")
def train_student(
    coco: Annotated[Path, typer.Argument(help="Training COCO JSON: ground truth and/or a pseudomask file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run directory (checkpoints, metrics, config).")],
    images: Annotated[Path | None, typer.Option(help="Training image folder [default: the JSON's folder].")] = None,
    val: Annotated[Path | None, typer.Option(help="Validation COCO JSON with GT masks: segm AP each epoch, "
                                                  "best checkpoint kept as best.pt.")] = None,
    val_images: Annotated[Path | None, typer.Option(help="Validation image folder [default: --val's folder].")]
    = None,
    preset: Annotated[PresetOpt, typer.Option(
        help="`paper`: Mask2Former R50 recipe (1024 px, batch 32, 50 epochs, ImageNet weights). `tiny`: a "
             "0.5 M-parameter model at 128 px from scratch, for tests and demos. Flags below override it.")]
    = PresetOpt.paper,
    backbone: Annotated[str | None, typer.Option(help="tiny, resnet18, resnet34, resnet50, resnet101, resnet152.")]
    = None,
    pretrained: Annotated[str | None, typer.Option(
        help="`auto` (ImageNet weights, cached or downloaded), `none` (random init), or a local transformers "
             "ResNet or Mask2Former (e.g. a released COCO checkpoint) directory [default: from --preset].")] = None,
    num_queries: Annotated[int | None, typer.Option(help="Object queries [paper: 100].")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels, multiple of 32 [paper: 1024].")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs [paper: 50].")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Train exactly this many steps, whatever --epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step over all workers [paper: 32].")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate; backbone ×0.1 [paper: 1e-4].")] = None,
    min_score: Annotated[float | None, typer.Option(help="Drop pseudomasks scoring lower [default: 0].")] = None,
    pseudo_weight: Annotated[float | None, typer.Option(
        help="Loss weight of pseudomask targets (mask, dice and class terms of their matched queries); GT "
             "weighs 1 [default: 1].")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints [paper: 1000].")] = None,
    data_workers: Annotated[int | None, typer.Option(help="Data-loading processes per worker [paper: 2].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [default: 0].")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (mixed precision on GPU).")] = "cpu",
    num_workers: Annotated[int, typer.Option(
        help="Ray Train workers (DDP; one GPU each with cuda); 0 trains in this process without Ray.")] = 0,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (`auto`, `ray://host:10001`) [default: a local Ray started here].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start the run in --output again.")] = False,
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of the image folders.")] = False,
) -> None:
    """Train a Mask2Former instance-segmentation student on ground truth plus pseudomasks.

    Writes the run directory: `student.json` (what `predict` rebuilds the model from), `metrics.jsonl`,
    `checkpoints/step_*.pt` (every --checkpoint-every steps and at each epoch end) and, with --val, `best.pt`.
    """
    from omnilabel.students.run import make_configs
    from omnilabel.students.train import train_student as run_training
    from omnilabel.students.train import training_display

    model, train, weights = make_configs(
        preset.value, backbone=backbone, pretrained=pretrained, num_queries=num_queries, image_size=image_size,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, min_score=min_score,
        pseudo_weight=pseudo_weight, checkpoint_every=checkpoint_every, data_workers=data_workers, seed=seed)
    with training_display(console) as on_metrics:
        summary = run_training(coco, run_dir=output, images_dir=images, val_json=val, val_images_dir=val_images,
                               model=model, train=train, pretrained=weights, device=device,
                               num_workers=num_workers, address=address, resume=resume, overwrite=overwrite,
                               allow_outside_images=allow_outside_images, on_metrics=on_metrics)
    best = f", best val AP {summary['best_ap']:.3f}" if summary.get("best_ap") is not None else ""
    out.print(f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s{best}; run directory {output}")


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="A run directory written by `omnilabel train-student`.")],
    images: Annotated[Path | None, typer.Option(
        help="Image folder; without --coco every image file in it, ids 1..N by name.")] = None,
    coco: Annotated[Path | None, typer.Option(
        help="COCO JSON naming the images and their ids (e.g. the validation GT).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="COCO results JSON to write.")] = Path(
        "predictions.json"),
    checkpoint: Annotated[str | None, typer.Option(
        help="`best`, `last` or a checkpoint path [default: best, else last].")] = None,
    score_thresh: Annotated[float, typer.Option(help="Drop predictions scoring lower.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Most predictions per image (Mask2Former: 100).")] = 100,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, … (mixed precision on GPU).")] = "cpu",
    batch_size: Annotated[int, typer.Option(
        help="Images per forward pass; also the unit a worker takes at a time, and of resume.")] = 8,
    num_workers: Annotated[int | None, typer.Option(
        help="Ray workers, each loading the student once [default: one per GPU with --device cuda, else 1]; "
             "0 runs in this process without Ray.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (`auto`, `ray://host:10001`) [default: a local Ray started here].")] = None,
    job_dir: Annotated[Path | None, typer.Option(
        help="Resumable job state [default: OUTPUT.job]; a rerun skips finished shards.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Restart a job directory that holds a different job.")] = False,
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of --images.")] = False,
) -> None:
    """Run a trained student over images and write COCO results (RLE masks, scores, boxes).

    The output is a results list that `COCO.loadRes` and `omnilabel evaluate` read.
    """
    from omnilabel.jobs.predict import predict_executor, run_predict
    from omnilabel.jobs.progress import progress_bar
    from omnilabel.students.inference import PredictConfig

    config = PredictConfig(score_thresh=score_thresh, top_k=top_k, batch_size=batch_size)
    run_shards = predict_executor(num_workers, address=address, device=device)
    with progress_bar("predict", console) as on_progress:
        summary = run_predict(run, output=output, images_dir=images, coco=coco, checkpoint=checkpoint, config=config,
                              device=device, job_dir=job_dir, overwrite=overwrite,
                              allow_outside_images=allow_outside_images, on_progress=on_progress,
                              run_shards=run_shards)
    failed = f", {summary['errors']} failed (see {summary['errors_path']})" if summary["errors"] else ""
    out.print(f"wrote {summary['predictions']} predictions for {summary['images']} images to {output}{failed}")
    if "images_json" in summary:
        out.print(f"image ids: {summary['images_json']}")


# -- evaluation ------------------------------------------------------------------------------------


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(
        help="COCO results list, or a complete COCO file such as a pseudomask output.")],
    gt: Annotated[Path, typer.Option(help="Ground-truth COCO JSON with instance masks.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON here.")] = None,
) -> None:
    """COCO mask AP of predictions; for pseudomasks, also teacher mIoU per weak type.

    Prints segm AP, AP50, AP75, APs/m/l (pycocotools), over the images a complete COCO file lists (every GT
    image for a results list). When the predictions are an omnilabel pseudomask
    file whose annotations carry `omnilabel.weak_id`, it also prints the mean mask IoU and mean boundary
    IoU of the pseudomasks against the GT masks of those ids, per weak type.
    """
    from omnilabel.data.coco import load_coco
    from omnilabel.eval.coco_eval import evaluate_segm
    from omnilabel.eval.miou import has_weak_ids, teacher_miou
    from omnilabel.io import read_json, write_json_atomic

    gt_data = load_coco(gt, allow_outside_images=True)
    pred = read_json(predictions)
    if isinstance(pred, dict):
        pred = load_coco(predictions, allow_outside_images=True)
    elif not isinstance(pred, list):
        raise InputError(f"{predictions}: expected a COCO results list or a COCO file, got {type(pred).__name__}")
    # A complete COCO file says which images it covers (a pseudomask file leaves out images it could not
    # label): AP is over those. A results list covers every GT image.
    image_ids = None
    title = f"COCO segm AP — {predictions.name}"
    if isinstance(pred, dict):
        image_ids = [int(im["id"]) for im in pred["images"]]
        if set(image_ids) != {int(im["id"]) for im in gt_data["images"]}:
            title += f" (its {len(image_ids)} of the GT's {len(gt_data['images'])} images)"
    metrics = evaluate_segm(pred, gt_data, image_ids=image_ids)
    table = Table(title=title)
    for key in metrics:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.3f}" for v in metrics.values()))
    out.print(table)
    result: dict[str, Any] = {"segm": metrics,
                              "images": len(image_ids) if image_ids is not None else len(gt_data["images"])}
    if isinstance(pred, dict) and has_weak_ids(pred):
        per_weak = teacher_miou(pred, gt_data)
        t = Table(title="pseudomask quality against GT (by weak type)")
        for col in ("weak", "count", "mIoU", "boundary IoU"):
            t.add_column(col, justify="right" if col != "weak" else "left")
        for weak, row in per_weak.items():
            t.add_row(weak, str(row["count"]), f"{row['miou']:.3f}", f"{row['boundary_iou']:.3f}")
        out.print(t)
        result["teacher"] = per_weak
    if json_out is not None:
        write_json_atomic(result, json_out)


# -- review ----------------------------------------------------------------------------------------


@app.command()
def visualize(
    coco: Annotated[Path, typer.Argument(
        help="COCO JSON to draw: a pseudomask output, a GT or weak file, or a results list (needs --gt).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the pictures into.")],
    images: Annotated[Path | None, typer.Option(
        help="Image folder [default: the folder of the JSON that lists the images; --gt's for a results "
             "list].")] = None,
    gt: Annotated[Path | None, typer.Option(
        help="Ground-truth COCO JSON: also write GT | prediction pictures with each image's mIoU.")] = None,
    uncertainty: Annotated[bool, typer.Option(
        "--uncertainty", help="Also write heat maps of the annotations' uncertainty maps "
                              "(`omnilabel.uncertainty`).")] = False,
    html: Annotated[bool, typer.Option(
        "--html", help="Also write index.html, a static page of every image (worst mIoU first with --gt).")]
    = False,
    min_score: Annotated[float, typer.Option(help="Do not draw annotations scoring lower.")] = 0.0,
    max_images: Annotated[int | None, typer.Option(help="Draw only the first N images (by id).")] = None,
    alpha: Annotated[float, typer.Option(help="Opacity of the mask colour, 0..1.")] = 0.45,
    thumb_size: Annotated[int, typer.Option(help="Side of the contact sheet's thumbnails in pixels.")] = 256,
) -> None:
    """Draw masks, prompts and labels on the images, for a person to review.

    Writes `images/<id>_<name>.png` (each image at its size, every instance in its own colour, with the
    point or box that prompted it and a `class score` label), `contact_sheet.png` (the first 100 images);
    with --gt, `compare/` (GT left, prediction right, with the image's mIoU); with --uncertainty,
    `uncertainty/`; with --html, `index.html`.
    """
    from omnilabel.jobs.progress import progress_bar
    from omnilabel.viz import VizConfig
    from omnilabel.viz import visualize as run_visualize

    config = VizConfig(min_score=min_score, max_images=max_images, alpha=alpha, thumb_size_px=thumb_size,
                       uncertainty=uncertainty, html=html)
    with progress_bar("visualize", console) as on_progress:
        summary = run_visualize(coco, output_dir=output, images_dir=images, gt_path=gt, config=config,
                                on_progress=on_progress)
    table = Table(title=f"wrote {summary['images']} images to {summary['output_dir']}")
    table.add_column("what")
    table.add_column("where", overflow="fold")
    table.add_row("overlays", f"{summary['output_dir']}/images/")
    if summary["compare"]:
        table.add_row("GT | prediction", f"{summary['output_dir']}/compare/ ({summary['compare']} images)")
    if uncertainty:
        table.add_row("uncertainty", f"{summary['output_dir']}/uncertainty/ ({summary['uncertainty']} images)")
    capped = f", first {summary['contact_sheet_images']} of {summary['images']} images" \
        if summary["contact_sheet_capped"] else ""
    table.add_row("contact sheet", f"{summary['contact_sheet']}{capped}")
    if summary["html"]:
        table.add_row("html", summary["html"])
    if gt is not None:
        mean = "n/a" if summary["mean_miou"] is None else f"{summary['mean_miou']:.3f}"
        table.add_row("mean mIoU", f"{mean} over {summary['scored_images']} images with GT masks")
    out.print(table)


# -- entry point -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turn library errors into one line and exit code 1."""
    try:
        app(args=argv, standalone_mode=False)
    except OmnilabelError as exc:
        if _state["debug"]:
            raise
        console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # Usage errors (typer's bundled click): show the usage line and the problem, exit 2.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
