"""What foundry-ui accepts from a browser, checked before anything runs: Hydra overrides (composed and validated as
`foundry-train` would, errors in the CLI's own one line), the memory planner's verdict, uploaded images (type, size
and count limits; written only under the data folder), and the subject wizard's DreamBooth-LoRA command."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, UnidentifiedImageError

from data.webdataset import expand_urls
from train.ops.launch import memory_plan
from train.ops.resolvers import compose_config
from train.ops.validate import fit_short_run, validate

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_FILE_BYTES = 20 * 2**20
MAX_FILES = 1000  # Starlette's own limit per request
MAX_REQUEST_FILE_BYTES = 512 * 2**20
OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.\-/\[\]]*=")
# the app sets these itself; a browser never does (where runs land, Hydra's own settings, what a cluster job runs)
RESERVED = ("paths.", "hydra.", "hydra/", "launcher.python")
# keys naming a folder or file a run writes (logger.save_dir, data.class_dir, data.shard_dir, offload paths ...);
# the ones a run only reads stay settable
WRITE_PATH = re.compile(r"(dir|dirpath|path|file|offload.*)$")
READ_PATHS = {"model.pretrained", "method.teacher", "data.urls", "repa.encoder", "data.instance_dir"}
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

# The subject wizard's settings: the DreamBooth-LoRA row of the README's results, measured on the digits world
# (rank 16 on attention and MLP, lr 1e-3, prior weight 5, class captions dropped 20% of the time).
WIZARD_DEFAULTS = ["adapter.rank=16", "adapter.target=attn_mlp", "optimizer.lr=1e-3", "method.prior_loss_weight=5",
                   "data.prior_caption_dropout=0.2"]


class BadInput(ValueError):
    """One line naming the input and the fix."""


def safe_name(name: str, what: str = "name") -> str:
    """A file or folder name reduced to [A-Za-z0-9._-], never empty, never '.' or '..'."""
    cleaned = SAFE_NAME.sub("_", Path(str(name)).name).strip("._")
    if not cleaned:
        raise BadInput(f"{what} '{name}' has no usable characters; use letters, digits, '.', '_' or '-'")
    return cleaned[:120]


def check_override(line: str) -> str:
    """One override a browser may set: an existing key (no +/~), no instantiation keys (`_target_`, `_args_`, ...),
    no key the app sets itself, no folder the run would write to (outside its own), no interpolation or resolver
    (`${...}`) and no `pipe:` stream (a shell command). Returns the line; BadInput says which rule it broke."""
    if not OVERRIDE.match(line):
        raise BadInput(f"override '{line}' is not key=value; write one Hydra override per line, e.g. "
                       "trainer.max_steps=100")
    key, _, value = line.partition("=")
    if key.startswith(("+", "~")):
        raise BadInput(f"override '{line}' adds or removes a config key; foundry-ui sets existing keys only (add keys "
                       "from the command line)")
    if key.startswith(RESERVED) or key == "run_name":
        raise BadInput(f"override '{line}' is set by foundry-ui itself (run name, output folder, Hydra, launcher "
                       "interpreter); use the form's fields")
    if any(part.startswith("_") for part in re.split(r"[./]", key)):
        raise BadInput(f"override '{line}' sets what a config instantiates; foundry-ui does not (use the command line)")
    if WRITE_PATH.search(key.rsplit(".", 1)[-1]) and key not in READ_PATHS:
        raise BadInput(f"override '{line}' points a run at a folder it writes; a run writes only inside its own folder "
                       "when launched from foundry-ui")
    if "${" in value or "pipe:" in value:
        raise BadInput(f"override '{line}' holds an interpolation or a pipe: command; give a plain value")
    return line


def parse_overrides(text: str) -> list[str]:
    """One Hydra override per line (key=value or group=option); blank lines and # comments skipped; each checked."""
    out = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(check_override(line))
    return out


def first_line(err: BaseException) -> str:
    """The error as one line; Hydra's first lines (what, the fix, why) joined, its key dump left out."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))][:3]
    return " ".join(lines)[:400] if lines else type(err).__name__


@dataclass
class Checked:
    overrides: list[str]
    notes: list[str]
    cfg: object  # the composed DictConfig


def check_config(overrides: list[str]) -> Checked:
    """Compose and validate exactly as `foundry-train` does before any work; BadInput with its one line."""
    try:
        cfg = compose_config(overrides)
        notes = [n for n in [fit_short_run(cfg)] if n]
        validate(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, FileNotFoundError) as err:
        raise BadInput(f"foundry-train: {first_line(err)}") from None
    return Checked(overrides, notes, cfg)


def plan_verdict(cfg) -> dict:
    """The memory planner on the composed config (foundry-plan's figure): fits or not, and its table."""
    try:
        plan = memory_plan(cfg, expand_urls(cfg.data.urls) if cfg.data.get("urls") else None)
    except (ValueError, FileNotFoundError) as err:
        return {"fits": None, "error": f"foundry-plan: {first_line(err)}"}
    return {"fits": bool(plan.fits), "table": plan.table(), "plan": plan.to_json()}


def resolved_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=False)


# -- uploads ---------------------------------------------------------------------------------------------------------
@dataclass
class Upload:
    filename: str
    data: bytes


def check_image(upload: Upload) -> None:
    if not upload.filename.lower().endswith(IMAGE_SUFFIXES):
        raise BadInput(f"upload '{upload.filename}' is not an image file ({', '.join(IMAGE_SUFFIXES)}); upload "
                       "images (and same-named .txt captions where the form asks for them)")
    try:
        with Image.open(io.BytesIO(upload.data)) as im:
            im.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise BadInput(f"upload '{upload.filename}' is not a readable image ({first_line(err)}); upload PNG, JPEG "
                       "or WebP files") from None


def save_uploads(uploads: list[Upload], dest: Path, *, captions: bool, min_images: int = 1,
                 max_images: int = MAX_FILES) -> list[Path]:
    """Check every file first (size, type, decodable), then write them all into `dest` (a folder the app chose
    under its data folder). Captions: `name.txt` beside `name.png`. Returns the image paths."""
    images, texts = [], []
    for up in uploads:
        if len(up.data) > MAX_FILE_BYTES:
            raise BadInput(f"upload '{up.filename}' is {len(up.data) / 2**20:.1f} MiB; the limit is "
                           f"{MAX_FILE_BYTES // 2**20} MiB per file")
        if captions and up.filename.lower().endswith(".txt"):
            try:
                up.data.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput(f"caption '{up.filename}' is not UTF-8 text; save it as UTF-8") from None
            texts.append(up)
            continue
        check_image(up)
        images.append(up)
    if not min_images <= len(images) <= max_images:
        raise BadInput(f"{len(images)} images uploaded; this form takes {min_images} to {max_images}")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for up in [*images, *texts]:
        path = dest / safe_name(up.filename, "file name")
        path.write_bytes(up.data)
        if up in images:
            written.append(path)
    return written


def wizard_command(*, base: str, instance_dir: Path, identifier: str, class_word: str, run_name: str, steps: int,
                   extra: list[str]) -> list[str]:
    """The DreamBooth-LoRA run the wizard launches: instance prompt 'a photo of <id> <class>', class images of
    'a photo of a <class>' generated by the base (prior preservation), preview grids of both prompts."""
    if not re.fullmatch(r"[A-Za-z0-9]{2,20}", identifier or ""):
        raise BadInput(f"identifier '{identifier}' must be one rare word of 2-20 letters or digits, e.g. sks")
    if not re.fullmatch(r"[A-Za-z][A-Za-z -]{0,39}", class_word or ""):
        raise BadInput(f"class word '{class_word}' must be a plain word such as dog, person or digit")
    instance_prompt, class_prompt = f"a photo of {identifier} {class_word}", f"a photo of a {class_word}"
    every = max(steps // 4, 1)
    return ["experiment=dreambooth_lora", f"model.pretrained={base}", f"data.instance_dir={instance_dir}",
            f"data.instance_prompt='{instance_prompt}'", f"data.class_prompt='{class_prompt}'",
            f"data.identifier={identifier}", f"trainer.max_steps={steps}", *WIZARD_DEFAULTS,
            f"callbacks.sample_images.prompts=['{instance_prompt}','{class_prompt}']",
            f"callbacks.sample_images.every_n_steps={every}", f"checkpoint.every_n_steps={every}", *extra,
            f"run_name={run_name}"]
