"""Model families, one file each (models/families/base.py explains the interface). Importing this package registers
them all; each family claims its own folders (by `model_index.json` or backbone class), so order does not matter."""
from models.families import dit, flux, flux2, qwen_image, sd, sd3, sdxl, zimage  # noqa: F401  (registration)
from models.families.base import (  # noqa: F401
                                  REGISTRY,
                                  Components,
                                  Family,
                                  family_for_folder,
                                  family_for_preset,
                                  family_named,
)
