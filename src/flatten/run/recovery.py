"""Recovery fine-tuning: LoRA adapters trained on text (peft), merged back so the model is stock again."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flatten.calibration import check_calibration
from flatten.checks import check_int


@dataclass
class Recovery:
    """How a recovery ran: its settings, the training loss of every step, and its time."""

    rank: int
    alpha: float
    dropout: float
    target_modules: str | list[str]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    samples: int
    seq_len: int
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def recover(model: nn.Module, data: Tensor, *, rank: int = 8, alpha: float = 16, dropout: float = 0.05,
            target_modules: str | list[str] = "all-linear", epochs: int = 2, batch_size: int = 4, lr: float = 2e-4,
            seed: int = 0, progress: bool = True) -> tuple[nn.Module, Recovery]:
    """Fine-tune LoRA adapters of ``rank`` on every linear layer of ``model`` (the LM head excepted) for
    ``epochs`` over ``data`` (samples x sequence length token ids, next-token loss; the paper: r = 8, about
    2 epochs), with AdamW at ``lr`` decaying linearly to 0, then merge them into the weights
    (``merge_and_unload``). Returns the model (same architecture and config, a stock checkpoint again) and
    the ``Recovery`` record. On CPU the same inputs and ``seed`` give the same weights."""
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError:
        raise ModuleNotFoundError("LoRA recovery needs peft: pip install 'flatten-gpt[recover]'") from None
    check_calibration(model, data)
    for name, value in (("rank", rank), ("epochs", epochs), ("batch_size", batch_size)):
        check_int(name, value)
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")

    record = Recovery(rank, alpha, dropout, target_modules, epochs, batch_size, lr, seed, *data.shape)
    torch.manual_seed(seed)  # adapter initialisation and dropout
    tuned = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                             target_modules=target_modules, task_type="CAUSAL_LM"))
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    record.trainable_parameters = sum(p.numel() for p in trainable)
    steps = epochs * -(-data.shape[0] // batch_size)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    device = next(model.parameters()).device
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    tuned.train()
    with tqdm(total=steps, desc="LoRA recovery", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            for batch in data[torch.randperm(data.shape[0], generator=order)].split(batch_size):
                ids = batch.to(device)
                loss = tuned(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {loss.item()} at step {len(record.losses)}; "
                                             "try a smaller lr")
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                record.losses.append(round(loss.item(), 5))
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    tuned.eval()
    merged = tuned.merge_and_unload()
    record.seconds = round(time.perf_counter() - start, 2)
    return merged, record
