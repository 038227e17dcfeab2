"""Teacher commands: ``pseudomask`` (the main job) and ``finetune-teacher``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import events, job_rows, out, pseudomask_tables, table
from omnilabel.cli.options import (
    Address,
    AllowOutsideImages,
    BatchSize,
    Device,
    Images,
    JobDir,
    NumWorkers,
    Overwrite,
    Resume,
    default_output,
    job_options,
)
from omnilabel.data.weak import WeakMode

_TEACHER_HELP = "A fine-tuned teacher file (`omnilabel finetune-teacher`)"


@app.command()
def pseudomask(
    coco: Annotated[Path, typer.Argument(help="Weak COCO JSON (tags, points, boxes; full masks pass through).")],
    weak: Annotated[WeakMode, typer.Option(
        help="Which weak labels to use: `auto` (each annotation by what it carries), `points`, `boxes`, "
             "`tags` (classes only), or `none` (ignore labels; detect every dataset class).")] = WeakMode.AUTO,
    images: Images = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Pseudomask COCO JSON [default: COCO.pseudo.json beside the input].")] = None,
    sam: Annotated[str | None, typer.Option(
        help="SAM checkpoint: vit_b, vit_l, vit_h or a path [default: the base the teachers were fine-tuned "
             "from, else vit_h].")] = None,
    detector: Annotated[str, typer.Option(
        help="Grounding DINO: grounding-dino-tiny, grounding-dino-base, a local folder, or `none` (points then "
             "use SAM's own box; images with tags or no labels are left out, unless --proposals or --prompter "
             "labels them).")] = "grounding-dino-tiny",
    teacher: Annotated[Path | None, typer.Option(help=f"{_TEACHER_HELP} for every SAM stage.")] = None,
    teacher_box: Annotated[Path | None, typer.Option(
        help=f"{_TEACHER_HELP} for boxes and detections (box-SAM), instead of --teacher there.")] = None,
    teacher_point: Annotated[Path | None, typer.Option(
        help=f"{_TEACHER_HELP} for stage 1 of points (P-SAM), instead of --teacher there.")] = None,
    teacher_refine: Annotated[Path | None, typer.Option(
        help=f"{_TEACHER_HELP} for stage 2 of points (BP-SAM), instead of --teacher there. The paper's three: "
             "`--teacher-box box_sam.pt --teacher-point p_sam.pt --teacher-refine bp_sam.pt`.")] = None,
    refine: Annotated[bool, typer.Option(
        "--refine/--no-refine", help="Points: refine with Grounding DINO boxes (Algorithm 1) and prompt again "
                                     "with box + point; --no-refine keeps the stage-1 masks (the paper's "
                                     "\"Point\" ablation).")] = True,
    clip: Annotated[str | None, typer.Option(
        help="CLIP, a name or a path: for class-aware teachers [default: the one the teacher was trained "
             "with] and, with --proposals, to classify entities [default: clip-vit-b-32]; with --prompter, "
             "given explicitly, to classify the prompter's masks; loaded only when one of them needs "
             "it.")] = None,
    clip_arch: Annotated[str | None, typer.Option(
        help="open_clip architecture of a --clip path for --proposals or --prompter (e.g. ViT-B-32) [default: "
             "the registry's].")] = None,
    proposals: Annotated[Path | None, typer.Option(
        help="Entities file (`omnilabel entities` on this COCO file): images with tags or no labels take their "
             "pseudomasks from its entity masks instead of Grounding DINO -> SAM. Each entity's masked crop is "
             "classified by CLIP's image tower against every class and a few background texts; its label is "
             "the likeliest of the image's tags (every class for unlabelled images and --weak none) and it is "
             "kept at probability >= --proposal-threshold, its mask as is (no SAM pass). Works with "
             "`--detector none`; with a detector, the detector only refines points. Images that need proposals "
             "and are not in the file are left out. Not with --refiner.")] = None,
    prompter: Annotated[Path | None, typer.Option(
        help="UOIS-SAM prompter file (`omnilabel train-prompter`, trained against this job's SAM): images with "
             "tags or no labels take class-agnostic masks from the prompts it generates (heatmap peaks -> SAM "
             "-> HDNet) instead of Grounding DINO -> SAM. With --clip each mask is classified as --proposals "
             "classifies entities (among the image's tags; every class for unlabelled images and --weak none; "
             "kept at --proposal-threshold); without --clip every mask goes out as category `object`, which "
             "the output adds to its categories. Works with `--detector none` (so `--weak none --detector none "
             "--prompter P` labels every image); with a detector, the detector only refines points. Not with "
             "--proposals or --refiner.")] = None,
    proposal_threshold: Annotated[float, typer.Option(
        help="--proposals, or --prompter with --clip: keep a mask when CLIP gives its label at least this "
             "probability; 0.5, the majority: more than every other class and the background "
             "together.")] = 0.5,
    refiner: Annotated[Path | None, typer.Option(
        help="SUM refiner (`finetune-teacher --prompts refine`): also write each pseudomask's uncertainty map "
             "(OUTPUT.uncertainty/) and `omnilabel.uncertainty_mean`, in the same pass. Refused with "
             "--proposals (entity masks have no SAM logits to refine) and --prompter.")] = None,
    box_threshold: Annotated[float, typer.Option(help="GDino confidence kept for tags/none (paper: 0.3).")] = 0.3,
    nms_iou: Annotated[float, typer.Option(help="GDino NMS IoU threshold (paper: 0.9).")] = 0.9,
    encoder_batch: Annotated[int, typer.Option(
        help="Images per SAM encoder forward pass; larger helps a GPU, output unchanged.")] = 1,
    prefetch: Annotated[int, typer.Option(
        help="Images read ahead on a background thread; 0 = off.")] = 2,
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    job_dir: JobDir = None,
    overwrite: Overwrite = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Turn weak annotations into COCO pseudomasks with SAM and Grounding DINO.

    Boxes prompt SAM directly; points go SAM → Grounding DINO refinement (Algorithm 1) → SAM with box and
    point; tags (and unlabelled images) go Grounding DINO with the image's classes → SAM, or with
    `--proposals` take the entity masks of `omnilabel entities` that CLIP classifies, or with `--prompter` the
    masks of UOIS-SAM's generated prompts (classified by `--clip`, else category `object`). Annotations with
    a `segmentation` pass through untouched. Each image is encoded by SAM once. The job is resumable: rerun
    it after an interruption. Default `--batch-size`: 16 images per shard.
    """
    from omnilabel.jobs.options import Dataset
    from omnilabel.jobs.pseudomask import PseudomaskConfig, Throughput, run_pseudomask
    from omnilabel.teachers.loading import TeacherSpec
    from omnilabel.teachers.pipeline import PipelineConfig
    from omnilabel.teachers.proposals import ProposalConfig

    job = job_options(num_workers, address, device, batch_size, job_dir=job_dir, overwrite=overwrite)
    roles = {"teacher": teacher, "teacher_box": teacher_box, "teacher_point": teacher_point,
             "teacher_refine": teacher_refine}
    spec = TeacherSpec(sam=sam, detector=detector, device=device, box_threshold=box_threshold, nms_iou=nms_iou,
                       clip=clip, clip_arch=clip_arch, refiner=None if refiner is None else str(refiner),
                       prompter=None if prompter is None else str(prompter),
                       **{k: str(v) for k, v in roles.items() if v is not None})
    setting = None if proposals is None else ProposalConfig(threshold=proposal_threshold)
    classify = None if prompter is None or clip is None else ProposalConfig(threshold=proposal_threshold)
    config = PseudomaskConfig(teachers=spec, pipeline=PipelineConfig(weak=weak, box_threshold=box_threshold,
                                                                      refine=refine, proposals=setting,
                                                                      prompter_clip=classify),
                              throughput=Throughput(encoder_batch=encoder_batch, prefetch=prefetch),
                              proposals=proposals)
    target = output or default_output(coco, ".pseudo.json")
    with events("pseudomask") as on_event:
        summary = run_pseudomask(Dataset(coco, images, allow_outside_images), target, job, config,
                                 on_event=on_event)
    for t in pseudomask_tables(summary):
        out.print(t)


@app.command("finetune-teacher")
def finetune_teacher(
    coco: Annotated[Path, typer.Argument(
        help="COCO JSON; its annotations with a `segmentation` (the fully annotated images) are trained on.")],
    prompts: Annotated[str, typer.Option(
        help="Prompts drawn from each GT mask: `points` (P-SAM: one random point inside), `boxes` (box-SAM: "
             "the mask's box), `points+boxes` (BP-SAM: point, box or both); or `refine`: SUM's refinement "
             "module for `--refiner` (SAM's mask for a click in each GT mask, with its box and the click, "
             "trained to give the GT mask).")] = "points+boxes",
    images: Images = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Teacher file [default: COCO.teacher.pt beside the input].")] = None,
    sam: Annotated[str | None, typer.Option(
        help="Base SAM: vit_b, vit_l, vit_h or a checkpoint path [default: --teacher's base, else vit_h].")] = None,
    teacher: Annotated[Path | None, typer.Option(
        help="Start from this fine-tuned teacher instead of the base SAM's decoder. With --prompts refine: the "
             "teacher whose pseudomasks the refiner will score.")] = None,
    unlabeled: Annotated[Path | None, typer.Option(
        help="SUM training: also train on the pseudomasks of this file, which must have uncertainty maps "
             "(`omnilabel uncertainty`); half of each batch, uncertainty-aware losses, points drawn where the "
             "pseudomask is certain, and a task prompt that tells GT from pseudomasks.")] = None,
    min_iou: Annotated[float, typer.Option(
        help="--prompts refine: drop training pairs whose SAM mask has IoU with the GT below this (SUM: "
             "0.7).")] = 0.7,
    class_aware: Annotated[bool, typer.Option(
        "--class-aware", help="Also train the ControlNet-style class prompt (CLIP text of each class).")] = False,
    stable: Annotated[bool, typer.Option(
        "--stable", help="Stable-SAM: keep all of SAM frozen and train only its ~0.08 M-parameter deformable "
                         "sampling + dynamic routing plugins, on a mixture of GT boxes, noisy boxes, 1/3/5/10 "
                         "points and coarse masks (--prompts is not used); Adam, lr 1e-3, 1 epoch by default. "
                         "The file holds only the plugins (a few hundred KB); with --teacher they sit on that "
                         "teacher's decoder.")] = False,
    clip: Annotated[str, typer.Option(help="CLIP for --class-aware: a name or a checkpoint path.")] = "clip-vit-b-32",
    clip_arch: Annotated[str | None, typer.Option(
        help="open_clip architecture of a --clip path (e.g. ViT-B-32) [default: the registry's].")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Optimizer steps [default: 36,874 (paper); with --stable one epoch of the instances "
             "(Stable-SAM)].")] = None,
    lr_drop_step: Annotated[int | None, typer.Option(
        help="Step at which the lr drops 10x [default: 75% of --steps; paper: 27,655].")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Learning rate [default: 1e-5, AdamW (paper); with --stable 1e-3, Adam (Stable-SAM)].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, prompts and point sampling.")] = 0,
    box_jitter: Annotated[bool, typer.Option(
        "--box-jitter/--no-box-jitter", help="Jitter box prompts as SAM's training does (noise of 10% of the "
                                             "box side, at most 20 px): the boxes met at inference come from a "
                                             "detector or a stage-1 mask, never the exact GT box.")] = True,
    train_encoder: Annotated[bool, typer.Option(
        "--train-encoder", help="Also train the image encoder (small teachers from scratch; no embedding "
                                "cache; the file then holds the encoder).")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.")] = 1000,
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    job_dir: JobDir = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Fine-tune SAM's prompt encoder and mask decoder on the fully annotated images: a teacher for pseudomask.

    The image encoder stays frozen and each image is encoded once for the whole run. Loss 5·CE + 5·Dice on
    12,544 uncertainty-sampled points per mask, AdamW, lr 1e-5 → 1e-6 at 75% of the steps. The teacher file
    holds only what was trained and names its base SAM; use it with `omnilabel pseudomask --teacher`. The job
    directory (`OUTPUT.run` by default) holds the embedding cache, checkpoints and the loss log. Default
    `--batch-size`: 32 instances per step (the paper's). `--stable` trains Stable-SAM's plugins instead, on a
    frozen SAM (or on top of `--teacher`).
    """
    from omnilabel.jobs.options import Dataset
    from omnilabel.jobs.train_teacher import TeacherRecipe, run_finetune_teacher
    from omnilabel.teachers.finetune import FinetuneConfig
    from omnilabel.teachers.finetune_data import parse_prompt_mode

    job = job_options(num_workers, address, device, batch_size, job_dir=job_dir, overwrite=overwrite,
                      resume=resume)
    epochs = 1.0 if stable and steps is None else None  # Stable-SAM: 1 epoch
    recipe = FinetuneConfig(prompts=parse_prompt_mode(prompts), min_iou=min_iou, class_aware=class_aware,
                            steps=36_874 if steps is None else steps, lr_drop_step=lr_drop_step, lr=lr, seed=seed,
                            box_jitter=box_jitter, train_encoder=train_encoder, checkpoint_every=checkpoint_every,
                            stable=stable)
    target = output or default_output(coco, ".teacher.pt")
    with events("finetune-teacher") as on_event:
        summary = run_finetune_teacher(Dataset(coco, images, allow_outside_images), target, job,
                                       TeacherRecipe(recipe, sam=sam, clip=clip, clip_arch=clip_arch,
                                                     teacher=None if teacher is None else str(teacher),
                                                     unlabeled=None if unlabeled is None else str(unlabeled),
                                                     epochs=epochs),
                                       on_event=on_event)
    rows = [("images / instances trained on", f"{summary['images']} / {summary['instances']}"),
            *([("pseudomasks (unlabelled, SUM)", str(summary["unlabeled"]))] if summary.get("unlabeled") else []),
            *([("refiner pairs kept / dropped (IoU < --min-iou)",
                f"{summary['pairs']['kept']} / {summary['pairs']['dropped']}")] if summary.get("pairs") else []),
            ("steps (resumed from)", f"{summary['steps']} ({summary['start_step']})")]
    if summary.get("trainable_parameters") is not None:
        rows.append(("trainable parameters", f"{summary['trainable_parameters']:,}"))
    if summary["last"]:
        rows.append(("last loss", f"{summary['last']['loss']:.4f}"))
    rows += [("run directory", summary["run_dir"]), ("wall time", f"{summary['wall_s']:.1f} s")]
    out.print(table(f"wrote {summary['output']} ({summary['size_mb']} MB)", rows))


@app.command()
def uncertainty(
    coco: Annotated[Path, typer.Argument(help="A pseudomask file (`omnilabel pseudomask` output).")],
    refiner: Annotated[Path, typer.Option(
        help="SUM refiner of the teacher that made the file (`finetune-teacher --prompts refine "
             "--teacher T.pt`).")],
    images: Images = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="COCO JSON with the maps [default: COCO.uncertainty.json beside the input]; the maps "
                               "go to OUTPUT.uncertainty/.")] = None,
    sam: Annotated[str | None, typer.Option(
        help="Base SAM, when the one the file records has moved [default: the recorded one].")] = None,
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    job_dir: JobDir = None,
    overwrite: Overwrite = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Add SUM uncertainty maps to the pseudomasks of an existing pseudomask file.

    Each image is encoded once; each pseudomask is decoded again from its recorded prompt with the SAMs the
    file records (a different teacher file is refused, and the decoded mask must equal the stored one), then
    the refiner refines it: u = |sigmoid(s) - sigmoid(refined)| per pixel. Every pseudomask gets
    `omnilabel.uncertainty` (a 16-bit PNG map) and `omnilabel.uncertainty_mean` (mean u over the mask and a
    3-pixel band around it). GT annotations are copied as they are. Resumable; `--num-workers N` runs on
    Ray. Default `--batch-size`: 16 images per shard. `pseudomask --refiner` does the same in its own pass.
    """
    from omnilabel.jobs.options import Dataset
    from omnilabel.jobs.uncertainty import UncertaintyConfig, run_uncertainty

    job = job_options(num_workers, address, device, batch_size, job_dir=job_dir, overwrite=overwrite)
    target = output or default_output(coco, ".uncertainty.json")
    with events("uncertainty") as on_event:
        summary = run_uncertainty(Dataset(coco, images, allow_outside_images), target,
                                  UncertaintyConfig(refiner=str(refiner), sam=sam), job, on_event=on_event)
    rows = [("images", str(summary["images"])), ("pseudomasks scored", str(summary["scored"])),
            ("mean uncertainty_mean", f"{summary['mean_uncertainty']:.4f}"),
            ("images that failed", str(summary["errors"]))]
    rows += job_rows(summary)
    rows += [("maps", summary["maps"]), ("wall time", f"{summary['wall_s']:.1f} s")]
    out.print(table(f"wrote {summary['output']}", rows))
