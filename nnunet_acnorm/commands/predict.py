"""``nnUNetv2_acnorm_predict`` / ``nnUNetv2_acnorm_predict_from_modelfolder``: nnU-Net's own
prediction commands (same arguments), with every checkpoint read by ``torch.load(weights_only=True)``.

Stock ``nnUNetv2_predict`` reads checkpoints with ``torch.load(weights_only=False)``, so a tampered
``checkpoint_final.pth`` runs the code its pickle names. These entry points replace ``torch.load``
in their own process by a weights-only load (numpy scalars of the training logs allowed; nothing
else), set ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` for any process they start, and then run nnU-Net's
entry point unchanged. A file that needs pickled code, a truncated file, or a checkpoint that does
not fit its network (for AC-Norm trainers: one without its source affines) ends the command with
one line naming the file.

Without the plugin, stock nnU-Net gets the same protection from the environment variable alone
for folded model folders (``nnUNetv2_acnorm_fold`` writes checkpoints of tensors and plain Python
values only): ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 nnUNetv2_predict_from_modelfolder -m <folded> ...``.
"""
from __future__ import annotations

import os

from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.errors import InputError


def _install_safe_torch_load() -> None:
    import torch

    from nnunet_acnorm.checkpoints.io import safe_torch_load

    if getattr(torch.load, "_acnorm_safe", False):
        return
    unsafe = torch.load

    def weights_only_load(f, map_location=None, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            return safe_torch_load(f, map_location=map_location)
        kwargs["weights_only"] = True
        return unsafe(f, map_location, *args, **kwargs)

    weights_only_load._acnorm_safe = True
    torch.load = weights_only_load


def _nnunet_entry(entry_name: str):
    def main(argv=None) -> None:
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # inherited by any worker process
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        _install_safe_torch_load()
        from nnunetv2.inference import predict_from_raw_data

        from nnunet_acnorm.checkpoints.io import CheckpointReadError

        try:
            getattr(predict_from_raw_data, entry_name)()  # parses sys.argv itself
        except CheckpointReadError as e:
            advice = (". Only if you trust its source, use nnU-Net's own command (it loads with weights_only=False)"
                      if e.kind == "pickle" else "")
            raise InputError(f"{e}{advice}") from None
        except RuntimeError as e:
            text = str(e)
            if "Error(s) in loading state_dict" not in text:
                raise
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            raise InputError(f"the checkpoint does not fit the network its trainer builds: "
                             f"{lines[1] if len(lines) > 1 else lines[0]}") from None
    return main


def predict_entry() -> None:
    run_command("nnUNetv2_acnorm_predict", _nnunet_entry("predict_entry_point"))


def predict_from_modelfolder_entry() -> None:
    run_command("nnUNetv2_acnorm_predict_from_modelfolder", _nnunet_entry("predict_entry_point_modelfolder"))


if __name__ == "__main__":
    predict_entry()
