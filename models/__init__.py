"""Networks, families, adapters and export formats (the bottom layer: imports nothing else of the project)."""
import logging as _logging

# Installed for model.quantize, torchao is imported by diffusers and transformers on every run; its messages about
# kernels for other GPUs, torch's pytree deprecation it triggers and diffusers' note on its tensor classes say
# nothing a user can act on (nor does bitsandbytes' note on a CPU kernel from the hub). Raised to errors here,
# before any of those libraries is imported.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
              "bitsandbytes.backends.cpu.ops"):  # a hub-downloaded CPU kernel; the built-in one is used
    _logging.getLogger(_name).setLevel(_logging.ERROR)
