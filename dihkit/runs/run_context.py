"""What one run of one seed works with: its settings, device, data, process group, seed and output."""
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import dataload
from dihkit.runs.distributed import Dist
from dihkit.foundations.settings import Settings


@dataclass
class RunContext:
    """Everything one run of one seed needs, built once by the console."""
    cfg: Settings
    device: torch.device
    data: dataload.DataBundle
    dist: Dist
    seed: int
    out: Path                      # the run's --path_to_save, with the seed suffix applied

    @property
    def info(self) -> dataload.DatasetInfo:
        """The dataset's description (classes, input size, normalization)."""
        return self.data.info

    def say(self, message: str) -> None:
        """One line on stdout from rank 0."""
        if self.dist.is_main:
            tqdm.write(message)

    def autocast(self):
        """bfloat16 autocast on the run's device (CUDA or CPU) when the run's precision is bf16; a no-op otherwise.

        On a CPU it pays off only where the processor computes in bfloat16 natively (AMX, perhaps AVX512-BF16);
        losses stay float32 either way (KD_Loss).
        """
        return self._bf16(self.cfg.run.amp)

    def eval_autocast(self):
        """bfloat16 autocast for evaluation only with ``--eval_precision bf16``: by default every split is evaluated
        in float32 whatever the training precision, so accuracies are the network's own (docs/SPEED.md)."""
        return self._bf16(self.cfg.run.eval_precision == "bf16")

    def _bf16(self, on: bool):
        """bfloat16 autocast on the run's device when ``on``, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if on else nullcontext()
