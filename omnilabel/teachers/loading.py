"""Build the teacher models a setting needs, from registry names or local paths.

A model is loaded only when the setting needs it: no GDino for ``boxes`` or with ``--detector none``; CLIP's
text tower when a fine-tuned teacher has a class module; CLIP with both towers (the ``classifier``) when
entity proposals are labelled (``pseudomask --proposals``) or the masks of a UOIS-SAM prompter are
(``pseudomask --prompter P --clip C``).

A prompter (``TeacherSpec.prompter``, a ``train-prompter`` file) brings its DINOv2 backbone (the name or folder
its file records) and must have been trained against the job's SAM: the one that encodes every image and
decodes for the roles without a teacher of their own (``Teachers.sam``: ``--teacher``'s when given, else the
base SAM's). Another SAM is refused when the models load (``uois.check_sam``), before any image is labelled.

Fine-tuned teachers (``omnilabel finetune-teacher``), one per role of the paper: ``teacher`` is used for
every SAM stage; ``teacher_box`` (box-SAM: boxes and detections), ``teacher_point`` (P-SAM: stage 1 of the
points setting) and ``teacher_refine`` (BP-SAM: stage 2) replace it for their stage. So the paper's three
teachers in one mixed run are ``teacher_box = box-SAM, teacher_point = P-SAM, teacher_refine = BP-SAM``.
Every teacher decodes from the one image encoder of the job (the base SAM's, or that of a teacher trained
with ``--train-encoder``, which then must be the same for all), so each image is still encoded once; a
teacher trained on another encoder is refused.

A Stable-SAM file (``finetune-teacher --stable``) holds plugins only and takes any role like a decoder
teacher: its plugins go into a copy of the decoder they were trained on, the base SAM's or the fine-tuned
teacher's it records (``teacher_ckpt.attach_teacher``). That start teacher is read when the models load, from
the path the file records (or beside it), so on a cluster it must be at that path on every node, like the
teacher files themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omnilabel.errors import CheckpointError, InputError
from omnilabel.events import OnEvent
from omnilabel.io import file_sha256
from omnilabel.teachers.pipeline import Teachers

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from omnilabel.models.registry import WeightRef
    from omnilabel.teachers.sam import SamTeacher, SamTeacherConfig
    from omnilabel.teachers.teacher_ckpt import TeacherFile

#: The base SAM when neither ``--sam`` nor a teacher names one (the paper's).
DEFAULT_SAM = "vit_h"
#: The CLIP that labels entity proposals when ``--clip`` names none.
DEFAULT_CLIP = "clip-vit-b-32"
#: The teacher roles of ``TeacherSpec``, in the order the base SAM and the encoder are looked up; the last,
#: ``refiner``, is SUM's refinement module (``finetune-teacher --prompts refine``), which scores pseudomasks.
ROLES = ("teacher", "teacher_box", "teacher_point", "teacher_refine", "refiner")


@dataclass(frozen=True)
class TeacherSpec:
    """Which models to load, as the user named them (registry names or paths; picklable).

    Attributes:
        sam: SAM checkpoint name or path; None: the base the teachers were fine-tuned from (recorded in
            their files), else ``vit_h`` (the paper's).
        detector: GDino name or directory, or ``"none"``.
        device: torch device string.
        box_threshold: GDino confidence for tags/none (paper §4.1: 0.3).
        nms_iou: GDino NMS IoU (paper §4.1: 0.9).
        multimask_single_point: keep the best-IoU of SAM's 3 masks for a lone point (SAM's convention).
        teacher: fine-tuned teacher file for every SAM stage, or None (plain SAM).
        teacher_box: teacher file for box prompts and detections (box-SAM), or None (``teacher``).
        teacher_point: teacher file for stage 1 of the points setting (P-SAM), or None (``teacher``).
        teacher_refine: teacher file for stage 2 of the points setting (BP-SAM), or None (``teacher``).
        clip: CLIP name or path for class-aware teachers (default: the one the teacher was trained with) and
            for the classifier of entity proposals (default: ``DEFAULT_CLIP``).
        clip_arch: the ``open_clip`` architecture of ``clip`` for the classifier (default: the registry's for a
            name, else ``ViT-B-32``); a class-aware teacher's CLIP takes the one its file records.
        refiner: SUM refinement module (a ``--prompts refine`` teacher file) that scores every pseudomask with an
            uncertainty map, or None.
        prompter: UOIS-SAM prompter file (``train-prompter``) whose generated prompts label the images that
            need a detector (tags, unlabelled), or None.
    """

    sam: str | None = None
    detector: str = "grounding-dino-tiny"
    device: str = "cpu"
    box_threshold: float = 0.3
    nms_iou: float = 0.9
    multimask_single_point: bool = True
    teacher: str | None = None
    teacher_box: str | None = None
    teacher_point: str | None = None
    teacher_refine: str | None = None
    clip: str | None = None
    refiner: str | None = None
    clip_arch: str | None = None
    prompter: str | None = None

    @property
    def has_detector(self) -> bool:
        return self.detector.lower() != "none"

    def teacher_files(self) -> dict[str, str]:
        """Role → teacher file, for the roles given."""
        return {role: str(getattr(self, role)) for role in ROLES if getattr(self, role) is not None}

    def with_base(self) -> TeacherSpec:
        """This spec with ``sam`` filled in: as given, else the base recorded in the first teacher file, else
        ``vit_h``.

        Raises:
            CheckpointError: a teacher file cannot be read.
        """
        if self.sam is not None:
            return self
        files = self.teacher_files()
        if not files:
            return dataclasses.replace(self, sam=DEFAULT_SAM)
        from omnilabel.teachers.teacher_ckpt import read_teacher

        return dataclasses.replace(self, sam=read_teacher(next(iter(files.values()))).base_source)


def model_source(name_or_path: str) -> str:
    """How a model is recorded to be found again: a registry name as is, a path made absolute."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


def model_id(name_or_path: str) -> str:
    """How a model is named in outputs: the registry name, or the file or folder name of a path."""
    p = Path(name_or_path)
    return p.name if (p.exists() or "/" in name_or_path) else name_or_path


def _read_files(spec: TeacherSpec) -> dict[str, TeacherFile]:
    from omnilabel.teachers.teacher_ckpt import read_teacher

    cache: dict[str, TeacherFile] = {}
    for path in spec.teacher_files().values():
        if path not in cache:
            cache[path] = read_teacher(path)
    files = {role: cache[path] for role, path in spec.teacher_files().items()}
    for role, tf in files.items():
        check_role(role, tf)
    return files


def check_role(role: str, tf: TeacherFile) -> None:
    """A refiner (``prompts: refine``) goes to ``--refiner`` only, and only a refiner goes there.

    Raises:
        CheckpointError: naming the file and the flag it belongs to.
    """
    is_refiner = tf.meta.get("prompts") == "refine"
    if role == "refiner" and not is_refiner:
        raise CheckpointError(f"--refiner {tf.path} is a teacher for prompts {tf.meta.get('prompts')!r}, not a "
                              "refiner; train one with `omnilabel finetune-teacher --prompts refine`")
    if role != "refiner" and is_refiner:
        raise CheckpointError(f"--{role.replace('_', '-')} {tf.path} is a refiner (it refines SAM's masks and "
                              "scores their uncertainty); pass it as --refiner")


def _encoder_file(files: dict[str, TeacherFile]) -> TeacherFile | None:
    """The first teacher (in ``ROLES`` order) that holds its image encoder, if any; for Stable-SAM plugins
    stacked on a teacher that holds its encoder, that teacher."""
    from omnilabel.teachers.teacher_ckpt import read_teacher

    for tf in files.values():
        if tf.encoder_included:
            return tf
        if tf.is_stable and tf.meta.get("start"):
            from omnilabel.teachers.stable import start_file

            start = read_teacher(start_file(tf))
            if start.encoder_included:
                return start
    return None


def model_refs(spec: TeacherSpec, *, load_detector: bool, load_classifier: bool = False) -> dict[str, WeightRef]:
    """What the driver sends its workers: every model the job needs, as names and paths (nothing is
    downloaded; teacher files are read here, and carry their sha256 so that each worker checks it has the same).

    Keys: ``sam`` (unless a teacher holds the encoder), each role given, ``clip`` (class-aware teachers),
    ``detector`` (when ``load_detector`` and the spec has one), ``classifier`` (CLIP with its image tower, for
    entity proposals or prompter masks, when ``load_classifier``), and with a prompter ``prompter`` (the file,
    with its sha256) and ``prompter_backbone`` (the DINOv2 its file records, kind ``dinov2``).

    Raises:
        CheckpointError: a teacher or prompter file is missing or unreadable; a name is unknown; the teachers
            disagree on their CLIP.
    """
    from omnilabel.models.registry import weight_ref

    spec = spec.with_base()
    files = _read_files(spec)
    shas = {str(tf.path): file_sha256(tf.path) for tf in files.values()}
    refs = {role: weight_ref(tf.path, kind="teacher", sha256=shas[str(tf.path)]) for role, tf in files.items()}
    if _encoder_file(files) is None:
        refs["sam"] = weight_ref(str(spec.sam), kind="sam")
    clip_teachers = [tf for tf in files.values() if tf.class_aware]
    if clip_teachers:
        sources = {tf.clip["source"] for tf in clip_teachers if tf.clip}
        if spec.clip is None and len(sources) > 1:
            raise CheckpointError(f"the teachers were trained with different CLIPs ({', '.join(sorted(sources))})")
        refs["clip"] = weight_ref(spec.clip or sources.pop(), kind="clip")
    if load_detector and spec.has_detector:
        refs["detector"] = weight_ref(spec.detector, kind="gdino")
    if load_classifier:
        refs["classifier"] = weight_ref(spec.clip or DEFAULT_CLIP, kind="clip")
    if spec.prompter is not None:
        from omnilabel.teachers.uois import read_prompter

        pf = read_prompter(spec.prompter)
        refs["prompter"] = weight_ref(pf.path, kind="prompter", sha256=file_sha256(pf.path))
        refs["prompter_backbone"] = weight_ref(str(pf.backbone["source"]), kind="dinov2")
    return refs


def refiner_mismatch(spec: TeacherSpec, refs: Mapping[str, WeightRef]) -> str | None:
    """Why the refiner may not fit the job's teachers, as one line, or None.

    A refiner learns how one teacher's masks differ from the GT (``finetune-teacher --prompts refine
    --teacher T``); its file records that teacher's sha256 (or none, for the base SAM). Another teacher's
    masks still get maps, but they measure the wrong teacher's errors: a warning, not an error.
    """
    if spec.refiner is None or "refiner" not in refs:
        return None
    from omnilabel.teachers.teacher_ckpt import read_teacher

    start = read_teacher(spec.refiner).meta.get("start") or {}
    teachers = {ref.sha256 for role, ref in refs.items() if role in ROLES and role != "refiner"}
    if not teachers and not start:
        return None
    if start.get("sha256") in teachers:
        return None
    trained_on = f"teacher {start.get('id')}" if start else "the base SAM"
    used = "the base SAM" if not teachers else "teacher(s) " + ", ".join(
        model_id(str(getattr(spec, r))) for r in ROLES if r != "refiner" and getattr(spec, r) is not None)
    return (f"refiner {model_id(spec.refiner)} was trained on the masks of {trained_on}, but this job's masks "
            f"come from {used}: its maps measure another model's errors (train one with `finetune-teacher "
            "--prompts refine --teacher T.pt`)")


def resolve_refs(models: Mapping[str, WeightRef | Path], *, on_event: OnEvent | None = None) -> dict[str, Path]:
    """Local paths on this node of ``models`` (``model_refs``; a ``Path`` is taken as already local).

    Raises:
        CheckpointError: a model is not on this node and cannot be downloaded here, or a teacher file here is
            not the one the driver read (the message names the node and what to do).
    """
    from omnilabel.models.registry import locate

    return {key: (m if isinstance(m, Path) else locate(m, on_event=on_event)).resolve() for key, m in models.items()}


def resolve_paths(spec: TeacherSpec, *, load_detector: bool, on_event: OnEvent | None = None) -> dict[str, Path]:
    """Local paths of every model the job needs, downloading named ones first (``model_refs`` then
    ``resolve_refs`` on this machine).

    Raises:
        CheckpointError: a model is missing and cannot be downloaded (the message says what to do), or a
            teacher file is missing or unreadable.
    """
    return resolve_refs(model_refs(spec, load_detector=load_detector), on_event=on_event)


def load_teachers(spec: TeacherSpec, paths: dict[str, Path], *, categories: dict[int, str] | None = None) -> Teachers:
    """Load the models at ``paths`` (from ``resolve_paths``) onto ``spec.device``.

    Args:
        spec: what to load.
        paths: local files.
        categories: category id → name of the dataset (class-aware teachers embed these names).

    Raises:
        CheckpointError: a teacher does not fit the job's image encoder or CLIP; the prompter was trained against
            another SAM (naming both) or on another backbone. InputError: no CUDA for ``cuda``.
    """
    import torch

    from omnilabel.models.sam_loader import load_sam
    from omnilabel.teachers.gdino import GDinoConfig, GDinoTeacher
    from omnilabel.teachers.sam import SamTeacher, SamTeacherConfig
    from omnilabel.teachers.teacher_ckpt import build_full_sam, read_teacher, state_dict_sha256

    spec = spec.with_base()
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {spec.device}: no CUDA device is available here; use --device cpu")
    config = SamTeacherConfig(multimask_single_point=spec.multimask_single_point)
    read: dict[Path, TeacherFile] = {}
    files: dict[str, TeacherFile] = {}
    for role in (r for r in ROLES if r in paths):
        if paths[role] not in read:
            read[paths[role]] = read_teacher(paths[role])
        files[role] = read[paths[role]]
        check_role(role, files[role])
    encoder_file = _encoder_file(files)
    ids: dict[str, str] = {}
    if encoder_file is not None:
        encoder_sam = build_full_sam(encoder_file, device=spec.device)
        encoder_sha, encoder_name = encoder_file.encoder_sha256, f"teacher {encoder_file.path}"
        ids["sam"] = str(encoder_file.meta["base"]["id"])
    else:
        encoder_sam = load_sam(paths["sam"], device=spec.device)
        ids["sam"] = model_id(str(spec.sam))
        encoder_sha = state_dict_sha256(encoder_sam.image_encoder.state_dict()) if files else ""
        encoder_name = f"--sam {spec.sam}"
    clip = None
    if "clip" in paths:
        clip = _load_clip(paths["clip"], [tf for tf in files.values() if tf.class_aware], spec)
        ids["clip"] = model_id(spec.clip or str(paths["clip"]))

    made: dict[Path, SamTeacher] = {}

    def make(tf: TeacherFile) -> SamTeacher:
        if tf.path not in made:
            made[tf.path] = _teacher(tf, encoder_sam, encoder_sha=encoder_sha, encoder_name=encoder_name, clip=clip,
                                     categories=categories or {}, config=config, device=spec.device)
        return made[tf.path]

    roles = {role: make(tf) for role, tf in files.items()}
    sam = roles.get("teacher") or SamTeacher(encoder_sam, config=config, device=spec.device)
    for role, tf in files.items():
        ids[role] = model_id(str(tf.path))
    detector = None
    if "detector" in paths:
        detector = GDinoTeacher(paths["detector"], device=spec.device,
                                config=GDinoConfig(box_threshold=spec.box_threshold, nms_iou=spec.nms_iou))
        ids["detector"] = model_id(spec.detector)
    classifier = None
    if "classifier" in paths:
        from omnilabel.teachers.proposals import ClipImageClassifier

        classifier = ClipImageClassifier.from_pretrained(paths["classifier"], model_name=clip_arch(spec),
                                                         device=spec.device)
        ids["classifier"] = model_id(spec.clip or DEFAULT_CLIP)
    prompter = None
    if "prompter" in paths:
        from omnilabel.teachers.uois import load_prompter, read_prompter

        sam_name = f"--teacher {files['teacher'].path}" if "teacher" in files else encoder_name
        prompter = load_prompter(read_prompter(paths["prompter"]), sam, paths["prompter_backbone"],
                                 sam_name=sam_name)
        ids["prompter"] = model_id(str(spec.prompter or paths["prompter"]))
    return Teachers(sam=sam, detector=detector, box_sam=roles.get("teacher_box"),
                    point_sam=roles.get("teacher_point"), refine_sam=roles.get("teacher_refine"),
                    refiner=roles.get("refiner"), classifier=classifier, prompter=prompter, model_ids=ids)


def clip_arch(spec: TeacherSpec) -> str:
    """The ``open_clip`` architecture of the proposals classifier: ``--clip-arch``, else the registry's for a
    name, else ``ViT-B-32`` (as ``finetune-teacher --clip`` takes it)."""
    from omnilabel.models.registry import REGISTRY

    if spec.clip_arch is not None:
        return spec.clip_arch
    named = REGISTRY.get(spec.clip or DEFAULT_CLIP)
    return named.architecture if named is not None and named.kind == "clip" else "ViT-B-32"


def _teacher(tf: TeacherFile, encoder_sam: Sam, *, encoder_sha: str, encoder_name: str, clip: object,
             categories: dict[int, str], config: SamTeacherConfig, device: str) -> SamTeacher:
    """A teacher's ``SamTeacher`` on the shared encoder (class-aware when the file has a class module)."""
    import torch

    from omnilabel.teachers.class_aware import ClassAwareSamTeacher
    from omnilabel.teachers.sam import SamTeacher
    from omnilabel.teachers.teacher_ckpt import attach_teacher, class_prompt_of

    sam = attach_teacher(tf, encoder_sam, encoder_sha256=encoder_sha, encoder_name=encoder_name)
    class_prompt = class_prompt_of(tf, sam)
    if class_prompt is None:
        teacher = SamTeacher(sam, config=config, device=device)
        task = tf.part("task_prompt").get("gt")
        if task is not None:  # a SUM teacher decodes as this dataset's GT (task 1)
            teacher.dense_offset = task.to(teacher.device, torch.float32).view(1, -1, 1, 1)
        return teacher
    return ClassAwareSamTeacher(sam, class_prompt, clip, categories, config=config, device=device)  # type: ignore[arg-type]


def _load_clip(path: Path, teachers: list[TeacherFile], spec: TeacherSpec) -> object:
    """The CLIP text encoder of the class-aware teachers, checked against what they were trained with.

    Raises:
        CheckpointError: its text tower differs from the one a teacher was trained with.
    """
    from omnilabel.teachers.clip_text import ClipTextEncoder
    from omnilabel.teachers.teacher_ckpt import state_dict_sha256

    record = teachers[0].clip or {}
    encoder = ClipTextEncoder.from_pretrained(path, model_name=str(record["model_name"]), device=spec.device)
    sha = state_dict_sha256(encoder.model.state_dict())
    for tf in teachers:
        if (tf.clip or {}).get("sha256") != sha:
            raise CheckpointError(
                f"teacher {tf.path} was trained with CLIP {tf.clip['id']!r} (text-tower sha256 "  # type: ignore[index]
                f"{str(tf.clip['sha256'])[:12]}…), but {path} has {sha[:12]}…; "  # type: ignore[index]
                f"pass --clip {tf.clip['source']}")  # type: ignore[index]
    return encoder
