"""DIH's intermediate heads: building them on a teacher, saving/loading them, and the cohort forward."""
import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from checkpoints import FORMAT, atomic_save, check_state_dict, safe_load
from errors import UserError

HEAD_FILE = re.compile(r"^head_(\d+)\.pth$")


class IntermediateHead(nn.Module):
    """Flatten the feature map and apply one linear layer: no pooling, no non-linearity."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """Logits of one mount-point feature map."""
        return self.fc(torch.flatten(feat, 1))


def mount_shapes(teacher: nn.Module, image_size: int) -> list[tuple[int, ...]]:
    """Shapes (C, H, W) of the teacher's mount-point features, from a dry run at the input size."""
    was_training = teacher.training
    teacher.eval()
    param = next(teacher.parameters())
    with torch.no_grad():
        _, feats, _ = teacher(torch.zeros(1, 3, image_size, image_size, device=param.device), features=True)
    teacher.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]


def build_heads(teacher: nn.Module, num_classes: int, image_size: int) -> nn.ModuleList:
    """One IntermediateHead per mount point of ``teacher``, sized by a dry run."""
    shapes = mount_shapes(teacher, image_size)
    return nn.ModuleList(IntermediateHead(c * h * w, num_classes) for c, h, w in shapes)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for a teacher or heads that must not change."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Cohort:
    """The frozen teacher and its frozen heads: one forward pass gives all k+1 logits.

    Deliberately not an ``nn.Module`` attribute of any trainable module, so optimizers, state dicts,
    ``.train()`` and DDP never see it.
    """

    def __init__(self, teacher: nn.Module, heads: nn.ModuleList | None = None):
        self.teacher = freeze(teacher)
        self.heads = freeze(heads) if heads is not None else nn.ModuleList()

    def to(self, *args, **kwargs) -> "Cohort":
        """Move or convert the teacher and the heads in place, as ``nn.Module.to`` does (device, memory format)."""
        self.teacher.to(*args, **kwargs)
        self.heads.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[final teacher logits, head_1 logits, ..., head_k logits] without building a graph."""
        logits, feats, _ = self.teacher(x, features=True)
        return [logits] + [head(f) for head, f in zip(self.heads, feats)]

    @torch.no_grad()
    def features(self, x: torch.Tensor):
        """The teacher's (logits, mount features, embedding), without a graph."""
        return self.teacher(x, features=True)


def fingerprint(model: nn.Module) -> str:
    """SHA-1 of a model's weights and buffers: ties heads to the exact teacher they were tuned on."""
    return digest_tensors(model.state_dict().items())


def digest_tensors(named) -> str:
    """SHA-1 of ``(name, tensor)`` pairs: names, then every tensor's bytes, in order."""
    digest = hashlib.sha1()
    for key, value in named:
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def heads_meta(teacher_arch: str, num_classes: int, image_size: int, dataset: str, shapes,
               teacher_fingerprint: str) -> dict:
    """What a head file records about the teacher it belongs to."""
    return {"teacher_arch": teacher_arch, "num_classes": num_classes, "image_size": image_size,
            "dataset": dataset, "num_heads": len(shapes), "mount_shapes": [list(s) for s in shapes],
            "teacher_fingerprint": teacher_fingerprint}


def save_heads(heads: nn.ModuleList, directory, meta: dict, **extra) -> list[Path]:
    """Write ``head_1.pth`` ... ``head_k.pth`` into ``directory`` atomically, each with its teacher's record."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, head in enumerate(heads, start=1):
        path = directory / f"head_{i}.pth"
        record = {"format": FORMAT, "kind": "head", "index": i, **meta, **extra,
                  "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}
        atomic_save(record, path)
        paths.append(path)
    # Heads beyond k left by an earlier run (another teacher) would make the folder fail to load.
    for p in directory.iterdir():
        m = HEAD_FILE.match(p.name)
        if m and int(m.group(1)) > len(heads):
            p.unlink()
    return paths


def load_heads(directory, teacher: nn.Module, meta: dict, heads: nn.ModuleList | None = None) -> nn.ModuleList:
    """Load the heads in ``directory`` and check them against the teacher described by ``meta``.

    The files are matched by their number (``head_2`` before ``head_10``); a missing, extra or
    mismatched head is a UserError naming it, and so are heads saved by different runs or epochs (a
    folder whose writing was interrupted). ``heads`` are the modules to load into (other methods'
    heads, e.g. TOFD's auxiliary classifiers); by default DIH heads built on ``teacher``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"heads directory '{directory}' does not exist")
    found = {}
    for p in directory.iterdir():
        m = HEAD_FILE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if heads is None:
        heads = build_heads(teacher, meta["num_classes"], meta["image_size"])
    k = len(heads)
    if not found:
        raise UserError(f"heads directory '{directory}' holds no head_<i>.pth files; "
                        f"run --training_type fine_tune first")
    missing = [i for i in range(1, k + 1) if i not in found]
    if missing:
        raise UserError(f"heads directory '{directory}' lacks head_{missing[0]}.pth; "
                        f"a {meta['teacher_arch']} teacher has {k} heads")
    extra = sorted(i for i in found if not 1 <= i <= k)
    if extra:
        raise UserError(f"heads directory '{directory}' has an extra head_{extra[0]}.pth; "
                        f"a {meta['teacher_arch']} teacher has {k} heads")
    origin = None
    for i, head in enumerate(heads, start=1):
        path = found[i]
        rec = safe_load(path, "head file")
        if rec.get("format") != FORMAT or rec.get("kind") != "head" or not isinstance(rec.get("state_dict"), dict):
            raise UserError(f"head file '{path}' is not a head checkpoint of this toolkit")
        if rec.get("index") != i:
            raise UserError(f"head file '{path}' holds head {rec.get('index')}, not head {i}; was it renamed?")
        saved_by = (rec.get("seed"), rec.get("epoch"), rec.get("selected_on"))
        if origin is not None and saved_by != origin:
            raise UserError(f"head file '{path}' was saved by another run or epoch (seed, epoch, selection "
                            f"{saved_by}) than head_1.pth ({origin}); fine-tune the heads again")
        origin = saved_by
        for key in ("teacher_arch", "num_classes", "image_size", "num_heads"):
            if rec.get(key) != meta[key]:
                raise UserError(f"head file '{path}' belongs to a teacher with {key}={rec.get(key)}, "
                                f"but this teacher has {key}={meta[key]}")
        if rec.get("teacher_fingerprint") != meta["teacher_fingerprint"]:
            raise UserError(f"head file '{path}' was fine-tuned on a different {meta['teacher_arch']} "
                            f"checkpoint than --saved_path; fine-tune heads for this teacher")
        check_state_dict(head, rec["state_dict"], "head file", path)
        head.load_state_dict(rec["state_dict"])
    return heads
