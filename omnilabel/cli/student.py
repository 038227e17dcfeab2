"""Student commands: ``train-student`` and ``predict``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import events, out
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
    job_options,
)


class PresetOpt(str, Enum):
    paper = "paper"
    tiny = "tiny"


@app.command("train-student")
def train_student(
    coco: Annotated[Path, typer.Argument(help="Training COCO JSON: ground truth and/or a pseudomask file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run directory (checkpoints, metrics, config).")],
    images: Images = None,
    val: Annotated[Path | None, typer.Option(help="Validation COCO JSON with GT masks: segm AP each epoch, "
                                                  "best checkpoint kept as best.pt.")] = None,
    val_images: Annotated[Path | None, typer.Option(help="Validation image folder [default: --val's folder].")]
    = None,
    preset: Annotated[PresetOpt, typer.Option(
        help="`paper`: Mask2Former's R50 COCO instance recipe (1024 px LSJ, batch 32, 50 epochs, lr ×0.1 at 89% "
             "and 96% of the steps, ImageNet weights). `tiny`: a 0.5 M-parameter model at 128 px from scratch, "
             "for tests and demos. Flags below override it.")] = PresetOpt.paper,
    backbone: Annotated[str | None, typer.Option(help="tiny, resnet18, resnet34, resnet50, resnet101, resnet152.")]
    = None,
    pretrained: Annotated[str | None, typer.Option(
        help="`auto` (ImageNet weights from the registry: cached or downloaded), `none` (random init), or a local "
             "transformers ResNet or Mask2Former (e.g. a released COCO checkpoint) directory [default: from "
             "--preset].")] = None,
    num_queries: Annotated[int | None, typer.Option(help="Object queries [paper: 100].")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels, multiple of 32 [paper: 1024].")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs [paper: 50].")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Train exactly this many steps, whatever --epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate; backbone ×0.1 [paper: 1e-4].")] = None,
    lr_schedule: Annotated[str | None, typer.Option(
        help="`multistep` (×0.1 at 89% and 96% of the steps: Mask2Former's COCO instance recipe) or `poly` "
             "(power 0.9) [default: from --preset].")] = None,
    min_score: Annotated[float | None, typer.Option(help="Drop pseudomasks scoring lower [default: 0].")] = None,
    pseudo_weight: Annotated[float | None, typer.Option(
        help="Loss weight of pseudomask targets (mask, dice and class terms of their matched queries); GT "
             "weighs 1 [default: 1].")] = None,
    uncertainty: Annotated[bool, typer.Option(
        "--uncertainty/--no-uncertainty",
        help="Weight each pseudomask's mask loss (sigmoid CE and Dice at the sampled points) per point by its "
             "certainty 1 - u, u its uncertainty map (omnilabel.uncertainty, written by `omnilabel uncertainty`; "
             "run that first). GT weighs 1 everywhere. Fails before training if a pseudomask has no map; a run "
             "cannot be resumed with the other setting.")] = False,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints [paper: 1000].")] = None,
    data_workers: Annotated[int | None, typer.Option(help="Data-loading processes per worker [paper: 2].")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [default: 0].")] = None,
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Train a Mask2Former instance-segmentation student on ground truth plus pseudomasks.

    Writes the run directory (`-o`, the job's directory): `student.json` (what `predict` rebuilds the model
    from), `metrics.jsonl`, `checkpoints/step_*.pt` (every --checkpoint-every steps and at each epoch end) and,
    with --val, `best.pt`. On GPU it trains in mixed precision. Default `--batch-size`: the preset's (paper
    32, tiny 4).
    """
    from omnilabel.jobs.options import Dataset
    from omnilabel.jobs.train_student import StudentInputs, StudentRecipe, run_train_student
    from omnilabel.students.run import make_configs

    job = job_options(num_workers, address, device, batch_size, overwrite=overwrite, resume=resume)
    model, train, weights = make_configs(
        preset.value, backbone=backbone, pretrained=pretrained, num_queries=num_queries, image_size=image_size,
        epochs=epochs, max_steps=max_steps, lr=lr, lr_schedule=lr_schedule, min_score=min_score,
        pseudo_weight=pseudo_weight, uncertainty=uncertainty, checkpoint_every=checkpoint_every,
        data_workers=data_workers, seed=seed)
    inputs = StudentInputs(Dataset(coco, images, allow_outside_images),
                           Dataset(val, val_images, allow_outside_images) if val is not None else None)
    with events("train") as on_event:
        summary = run_train_student(inputs, output, job, StudentRecipe(model, train, weights), on_event=on_event)
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
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    job_dir: JobDir = None,
    overwrite: Overwrite = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Run a trained student over images and write COCO results (RLE masks, scores, boxes).

    The output is a results list that `COCO.loadRes` and `omnilabel evaluate` read. On GPU it predicts in
    mixed precision. The job is resumable. Default `--batch-size`: 8 images per forward pass and per shard.
    """
    from omnilabel.jobs.predict import PredictInputs, run_predict
    from omnilabel.students.inference import PredictConfig

    job = job_options(num_workers, address, device, batch_size, job_dir=job_dir, overwrite=overwrite)
    inputs = PredictInputs(run, coco=coco, images=images, checkpoint=checkpoint,
                           allow_outside_images=allow_outside_images)
    with events("predict") as on_event:
        summary = run_predict(inputs, output, job, PredictConfig(score_thresh=score_thresh, top_k=top_k),
                              on_event=on_event)
    failed = f", {summary['errors']} failed (see {summary['errors_path']})" if summary["errors"] else ""
    out.print(f"wrote {summary['predictions']} predictions for {summary['images']} images to {output}{failed}")
    if "images_json" in summary:
        out.print(f"image ids: {summary['images_json']}")
