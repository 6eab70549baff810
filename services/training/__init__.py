"""Training the embedder (`cbir train`), apart from the serving code it builds on.

    cli.py       get_args_parser(): every flag, and the command a bundle records (imports no other module here)
    settings.py  TrainingSettings: what the environment (and .env) supplies
    data.py      load_split(): a split decoded as the bundle says, cached; shared with evaluation
    augment.py   random crop (zero or reflect padding), flip and Cutout on the device, drawn there
    losses.py    batch-hard triplet and distillation terms
    sam.py       sharpness-aware minimisation around the optimizer (--sam-rho)
    loop.py      optimizer, schedule and warm-up, step, epoch, torch.compile, checkpoint and resume, SWA and EMA
    writer.py    write_bundle(): measure, fit the PCA, write the bundle
    trainer.py   train(args): the above in order (or `--time-budget-min` of training steps)
    bovw.py      `cbir train-bovw`: the study's Bag-of-Visual-Words model, its sweep and grid searches
"""

from services.training.cli import get_args_parser
from services.training.data import load_split
from services.training.trainer import train

__all__ = ["get_args_parser", "load_split", "train"]
