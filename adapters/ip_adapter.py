"""Style Reference and Content Reference through an SDXL IP-Adapter (diffusers' loaders).

Following InstantStyle, each kind of reference feeds the adapter into one attention layer only:
- style   -> the first cross-attention up block's second attention (SDXL: up_blocks.0.attentions.1),
             which carries colour, texture and brushwork but little layout;
- content -> the last cross-attention down block's second attention (SDXL: down_blocks.2.attentions.1),
             which carries layout and subject but little style.
So a style image does not drag its subject along, and a content image does not force its style.
Style and content in one request are two instances of the same adapter with their own images
and scales. Without references the adapter is unloaded: the UNet is exactly the plain one.

Strength (Leonardo's `weight` 0-2 or `strengthType`, never both) -> adapter scale on that layer:

| strengthType | weight range | weight used | adapter scale |
|--------------|--------------|-------------|---------------|
| Low          | 0   - 0.4    | 0.2         | 0.2           |
| Mid          | 0.4 - 0.8    | 0.6         | 0.6           |
| High         | 0.8 - 1.2    | 1.0         | 1.0           |
| Ultra        | 1.2 - 1.6    | 1.4         | 1.4           |
| Max          | 1.6 - 2      | 1.8         | 1.8           |

(adapter scale = weight: InstantStyle's recommended scale on the style layer is 1.0.)

Several style images: their CLIP image embeddings are averaged with weights proportional to their
`influence`, so only the ratio matters ((1, 1) behaves as (0.5, 0.5)); the adapter scale is the
influence-weighted mean of their weights.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import torch
from PIL import Image

from engine.conditioning import Guidance
from engine import paths
from engine.hashing import cached_sha256
from engine.loading import check_pickle, state_dict_keys
from engine.adapter import Context, Frame, Prepared
from engine.cache import DiskCache
from engine.images import load_rgb, pixel_digest
from engine.provenance import input_record, replay_image
from engine.request import GenerationRequest, ResolvedRequest
from engine.request_types import Reference

IP_ADAPTER_ENTRY = "ip-adapter-sdxl"
# The published variants: `vit-h` projects the CLIP image embedding to 4 tokens; `plus` resamples the
# encoder's penultimate hidden states to 16 tokens (more detail carried over, stronger likeness).
WEIGHT_FILES = {
    "vit-h": "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
    "plus": "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
}
IMAGE_ENCODER_FOLDER = "models/image_encoder"
KINDS = ("style", "content")


def block_scales(unet, kind: str, scale: float) -> dict:
    """diffusers' per-block IP-Adapter scale dict putting `scale` on the InstantStyle layer only."""
    if kind == "style":
        index = next(i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions"))
        count = len(unet.up_blocks[index].attentions)
        return {"up": {f"block_{index}": [scale if i == 1 else 0.0 for i in range(count)]}}
    index = max(i for i, block in enumerate(unet.down_blocks) if hasattr(block, "attentions"))
    count = len(unet.down_blocks[index].attentions)
    return {"down": {f"block_{index}": [scale if i == 1 else 0.0 for i in range(count)]}}


class IPAdapterGuidance(Guidance):
    """Image embeddings for each loaded adapter instance, CFG-batched (unconditional half first)."""

    def __init__(self, image_embeds: list[torch.Tensor]):
        self._image_embeds = image_embeds

    def unet_kwargs(self, latent_input, timestep, step: int, total: int, cond) -> dict:
        return {"added_cond_kwargs": {"image_embeds": self._image_embeds}}


@dataclass(frozen=True)
class AdapterFile:
    """One IP-Adapter weight file: a folder and the file's path inside it."""

    folder: Path
    weight_name: str  # may include a subfolder: "sdxl_models/ip-adapter_sdxl_vit-h.safetensors"


@dataclass(frozen=True, eq=False)
class AdapterUse:
    """One adapter instance a request needs: its file, its scale (a float or per-block dict), its embeddings."""

    file: AdapterFile
    scale: Union[float, dict]
    embeds: torch.Tensor  # (2B or B, 1, ...) unconditional half first, as diffusers batches them
    clip_embeds: Optional[torch.Tensor] = None  # FaceID-Plus: CLIP hidden states of the face crop, same batching


class IPAdapters:
    """The IP-Adapter instances of an engine (Style/Content Reference, and the Character Reference face
    adapters), a SharedModel (engine/adapter.py): all the instances a request uses are loaded together, in one
    diffusers load, and attached to the UNet for that generation only; after it the UNet is exactly the plain
    one again. The loaded instances are kept aside, so the next request with the same files attaches them
    without reading them again. The CLIP image encoder (ViT-H, from the `ip-adapter-sdxl` folder) is loaded
    once and shared."""

    order = 0  # before the LoRAs: loading FaceID switches its LoRA on

    def __init__(self, pipe, device, dtype, reference: Union[str, Path] = IP_ADAPTER_ENTRY,
                 variant: Literal["vit-h", "plus"] = "vit-h", image_encoder_folder: str = IMAGE_ENCODER_FOLDER,
                 cache_size: int = 64, allow_pickle: bool = False, manifest=None, weights_dir: Optional[Path] = None):
        self._pipe, self._device, self._dtype = pipe, device, dtype
        self._reference, self._encoder_folder = str(reference), image_encoder_folder
        self._manifest, self._weights_dir = manifest, weights_dir  # where a manifest name is looked up
        self._weight_file = WEIGHT_FILES[variant]
        self._hidden_states: dict[Path, bool] = {}  # by adapter file: does it resample hidden states?
        self._allow_pickle = allow_pickle
        self._loaded: tuple[AdapterFile, ...] = ()  # the files of the kept instances
        self._attached = False  # are they in the UNet now?
        self._plain: dict = {}  # the UNet's own attention processors, put back on detach
        self._kept: Optional[tuple[dict, torch.nn.Module]] = None  # their (attention processors, image projection)
        self._encoder = None  # (CLIP vision model, its image processor), loaded on first need
        self._encoder_id: Optional[str] = None  # encoder file hash: worked out once, on first need
        self._encodings = DiskCache(lambda: paths.cache_dir() / "references", suffix=".safetensors",
                                    encode=_encoding_bytes, decode=self._encoding_from_file, max_items=cache_size)
        self.encoder_runs = 0  # how many times the image encoder ran (the cache's effect is observable)

    # -- Style / Content Reference --------------------------------------------------------------

    def reference_uses(self, references: list[Reference], batch: int, guided: bool) -> list[AdapterUse]:
        """One adapter instance per kind of reference (style, content) with its InstantStyle block scales."""
        if not references:
            return []
        uses, file = [], AdapterFile(self._folder(), self._weight_file)
        hidden_states = self._feeds_on_hidden_states(file.folder / file.weight_name)
        for kind in KINDS:
            chosen = [r for r in references if r.kind == kind]
            if chosen:
                positive, negative = self._combined(chosen, hidden_states)
                embeds = cfg_rows(positive, negative, batch, guided).to(self._device, self._dtype)
                uses.append(AdapterUse(file, block_scales(self._pipe.unet, kind, _weighted_scale(chosen)), embeds))
        return uses

    def image_use(self, image: Image.Image, scale: float, batch: int, guided: bool, variant: str = "plus") -> AdapterUse:
        """One adapter instance of `variant` fed one image at a uniform scale (every attention layer): the
        character's appearance (adapters/appearance.py)."""
        file = AdapterFile(self._folder(), WEIGHT_FILES[variant])
        positive, negative = self.encode(image, self._feeds_on_hidden_states(file.folder / file.weight_name))
        return AdapterUse(file, scale, cfg_rows(positive, negative, batch, guided).to(self._device, self._dtype))

    # -- any adapters ---------------------------------------------------------------------------

    @contextmanager
    def applied(self, uses: list[AdapterUse]) -> Iterator[tuple[Guidance, ...]]:
        """These adapter instances in the UNet for the `with` block (in this order, with their scales and
        embeddings); the plain UNet again after it, also when the block raises."""
        if not uses:
            yield ()
            return
        try:
            yield (self._apply(uses),)
        finally:
            self._detach()

    def unload(self) -> None:
        """Drop the kept instances: the next request loads its adapter files again."""
        self._detach()
        self._loaded, self._kept = (), None

    def _apply(self, uses: list[AdapterUse]) -> IPAdapterGuidance:
        """Attach exactly these adapter instances (in this order), set their scales; their guidance."""
        self._attach(tuple(use.file for use in uses))
        for index, use in enumerate(uses):
            if use.clip_embeds is not None:  # FaceID-Plus-v2: the face crop's CLIP states, and the v2 shortcut
                projection = self.projection(index)
                projection.clip_embeds = use.clip_embeds.to(self._device, self._dtype)
                projection.shortcut = True
        self._pipe.set_ip_adapter_scale([use.scale for use in uses])
        return IPAdapterGuidance([use.embeds for use in uses])

    def projection(self, index: int) -> torch.nn.Module:
        """The image projection of loaded instance `index` (InstantID feeds its tokens to IdentityNet too)."""
        return self._pipe.unet.encoder_hid_proj.image_projection_layers[index]

    def _attach(self, files: tuple[AdapterFile, ...]) -> None:
        if files != self._loaded:
            self.unload()
            self._load(files)
        elif not self._attached:  # the same files as last time: put the kept instances back
            processors, projection = self._kept
            self._set(processors, projection, "ip_image_proj")
        self._attached = True

    def _load(self, files: tuple[AdapterFile, ...]) -> None:
        for file in files:
            check_pickle(file.folder / file.weight_name, self._allow_pickle)
        if self._encoder is not None:  # ours, so diffusers loads none (InstantID alone needs no encoder at all)
            self._register_encoder()
        weight_paths = [Path(file.weight_name) for file in files]
        self._plain = dict(self._pipe.unet.attn_processors)
        try:
            self._pipe.load_ip_adapter(
                [str(file.folder) for file in files], subfolder=[str(p.parent) if str(p.parent) != "." else "" for p in weight_paths],
                weight_name=[p.name for p in weight_paths], image_encoder_folder=None, local_files_only=True,
            )
        except BaseException:
            self._set(self._plain, None, None)  # nothing of a failed load stays in the UNet
            raise
        unet = self._pipe.unet
        unet.encoder_hid_proj.to(self._device, self._dtype)
        self._loaded, self._kept = files, (dict(unet.attn_processors), unet.encoder_hid_proj)

    def _detach(self) -> None:
        """The UNet's own processors back, the IP-Adapter's kept aside (what diffusers' unload_ip_adapter
        undoes, without discarding the loaded weights)."""
        if self._attached:
            self._set(self._plain, None, None)
            self._attached = False

    def _set(self, processors: dict, projection, projection_type: Optional[str]) -> None:
        unet = self._pipe.unet
        if projection is None:
            # As the plain UNet has it: a plain attribute, not an empty module slot (a compiled UNet then finds
            # its plain graph again instead of compiling another for a different module tree).
            delattr(unet, "encoder_hid_proj")
        unet.encoder_hid_proj = projection  # first: a Resampler projection has attention processors of its own
        unet.config.encoder_hid_dim_type = projection_type  # as diffusers' load/unload_ip_adapter set it
        unet.set_attn_processor(dict(processors))  # diffusers empties the dict it is given

    def _register_encoder(self) -> None:
        if self._encoder is None:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            folder = self._folder() / self._encoder_folder
            encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
            size = encoder.config.image_size
            self._encoder = (encoder.to(self._device, self._dtype).eval(), CLIPImageProcessor(size=size, crop_size=size))
        self._pipe.register_modules(image_encoder=self._encoder[0], feature_extractor=self._encoder[1])

    def _folder(self) -> Path:
        from engine import weights

        return weights.locate(self._reference, self._weights_dir, self._manifest)

    def _feeds_on_hidden_states(self, file: Path) -> bool:
        if file not in self._hidden_states:
            self._hidden_states[file] = resamples_hidden_states(file)
        return self._hidden_states[file]

    def _combined(self, references: list[Reference], hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Influence-weighted mean of the references' embeddings (only the ratio of influences matters)."""
        encoded = [self.encode(r.image, hidden_states) for r in references]
        total = sum(r.influence for r in references)
        positive = sum((r.influence / total) * pos for r, (pos, _) in zip(references, encoded))
        return positive, encoded[0][1]

    def encode(self, image, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP image embedding (or penultimate hidden states) and its unconditional counterpart, cached by
        image content + encoder identity (the encoder file's sha256 and which output), in memory and on disk."""
        picture = load_rgb(image, "reference image")
        if self._encoder_id is None:
            self._encoder_id = self._encoder_identity(self._folder())
        key = hashlib.sha256(f"{pixel_digest(picture)}|{self._encoder_id}|hidden_states={hidden_states}".encode()).hexdigest()
        encoded = self._encodings.get(key)
        if encoded is None:
            encoded = self._run_encoder(picture, hidden_states)
            self._encodings.put(key, encoded)
        return encoded

    def _encoder_identity(self, folder: Path) -> str:
        encoder = folder / self._encoder_folder / "model.safetensors"
        return cached_sha256(encoder) if encoder.is_file() else self._reference

    def _run_encoder(self, picture: Image.Image, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._register_encoder()
        with torch.inference_mode():
            positive, negative = self._pipe.encode_image(picture, self._device, 1, output_hidden_states=hidden_states)
        self.encoder_runs += 1
        return positive, negative  # (1, D) each; hidden states: (1, tokens, D)

    def _encoding_from_file(self, path: Path) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (OSError, ValueError, RuntimeError):
            return None  # damaged: encode again
        return tensors["positive"].to(self._device, self._dtype), tensors["negative"].to(self._device, self._dtype)


class StyleContentReferences:
    """Style and Content Reference, an Adapter (engine/adapter.py): one IP-Adapter instance per kind."""

    def __init__(self, ip_adapters: IPAdapters):
        self.ip_adapters = ip_adapters

    def prepare(self, request: GenerationRequest, ctx: Context) -> Optional["PreparedReferences"]:
        if not request.references:
            return None
        pictures = [load_rgb(ref.image, f"{ref.kind} reference {i + 1}") for i, ref in enumerate(request.references)]
        records = [input_record(ref, picture) for ref, picture in zip(request.references, pictures)]
        loaded = [ref.model_copy(update={"image": picture}) for ref, picture in zip(request.references, pictures)]
        return PreparedReferences(self.ip_adapters, loaded, records)

    def replay(self, resolved: ResolvedRequest, ctx: Context) -> Optional["PreparedReferences"]:
        if not resolved.references:
            return None
        loaded = [Reference(**{**record, "image": replay_image(record["image"], f"{record['kind']} reference {i + 1}")})
                  for i, record in enumerate(resolved.references)]
        return PreparedReferences(self.ip_adapters, loaded, list(resolved.references))


class PreparedReferences(Prepared):
    def __init__(self, ip_adapters: IPAdapters, references: list[Reference], records: list[dict]):
        self._ip, self._references, self._records = ip_adapters, references, records

    def record(self) -> dict:
        return {"references": self._records}

    def patches(self, frame: Frame) -> list:
        return [(self._ip, use) for use in self._ip.reference_uses(self._references, frame.batch, frame.guided)]


def resamples_hidden_states(adapter_file: Path) -> bool:
    """Whether an IP-Adapter file feeds on the CLIP encoder's penultimate hidden states (the plus layouts:
    a Resampler with learnt latent queries) rather than its pooled embedding (a plain projection). The
    file's keys decide, as diffusers' loader decides which projection to build from them."""
    return any(key == "image_proj.latents" for key in state_dict_keys(adapter_file))


def _encoding_bytes(encoded: tuple[torch.Tensor, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    positive, negative = encoded
    return save({"positive": positive.float().cpu().contiguous(), "negative": negative.float().cpu().contiguous()})


def cfg_rows(positive: torch.Tensor, negative: torch.Tensor, batch: int, guided: bool) -> torch.Tensor:
    """(2B or B, *shape): `negative` rows first when guided, then `positive` for each image of the batch."""
    rows = [negative] * batch + [positive] * batch if guided else [positive] * batch
    return torch.stack(rows)


def _weighted_scale(references: list[Reference]) -> float:
    total = sum(r.influence for r in references)
    return sum(r.influence * r.scale for r in references) / total
