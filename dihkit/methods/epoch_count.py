"""The epoch a training batch belongs to, counted on the device, for methods whose loss follows the epoch.

Reading the trainer's epoch on the host would make every step wait for the device; instead the method
counts its own training batches in a buffer, which its state dict (and so a resumed run) carries.
"""
import torch


class CountsEpochs:
    """Mixin for a ``Method`` (an ``nn.Module``): ``count_epochs`` once, ``count_step`` in every forward."""

    def count_epochs(self, epochs: int, steps_per_epoch: int) -> None:
        """Start counting: ``steps_per_epoch`` training batches make one of ``epochs`` epochs."""
        if epochs < 1 or steps_per_epoch < 1:
            raise ValueError(f"epochs and steps_per_epoch must be positive, got {epochs} and {steps_per_epoch}")
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def current_epoch(self) -> torch.Tensor:
        """The 0-based epoch of the next training batch, at most ``epochs - 1`` (a 0-d tensor on the device)."""
        return torch.clamp(torch.div(self.steps_done, self.steps_per_epoch, rounding_mode="floor"),
                           max=self.epochs - 1)

    def count_step(self) -> None:
        """Count one batch, in training mode only: evaluation batches do not advance the epoch."""
        if self.training:
            with torch.no_grad():
                self.steps_done += 1
