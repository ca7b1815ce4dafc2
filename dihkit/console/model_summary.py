"""``--summary``: print the model a command would train, with torchsummary."""
import torch

import dataload
from models_repo import build_model


def summarize(arch: str, dataset: str, data_dir: str, device: torch.device, crop_size: int | None = None) -> None:
    """Print ``arch`` built for ``dataset`` at the size it trains on (a streamed dataset's ``crop_size``);
    built-in datasets need nothing on disk (their shapes are known)."""
    from torchsummary import summary
    info = dataload.known_info(dataset) or dataload.load_data(dataset, data_dir, 0, download=False,
                                                              crop_size=crop_size).info
    model = build_model(arch, info.num_classes).to(device)
    summary(model, (3, info.image_size, info.image_size), device=device.type)
