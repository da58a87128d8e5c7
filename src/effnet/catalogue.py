"""The TF Hub EfficientNet catalogue: one typed record per hub handle, 88 in all, written as data.

What a record says comes from the tfhub.dev model cards (tensorflow/tfhub.dev @81fdea8f,
`assets/docs/{google,tensorflow}/models/...`). Where a card disagrees with the code that made the artifact, the
record follows the code (shared/research/hub-catalogue.md §2 footnotes; each one still to be confirmed on the
real artifact by the parity harness):

- V2-B2 / V2-B3 pool 1408 / 1536 features, not 1280 (automl `Head` uses `round_filters(1280)`).
- V2 `imagenet1k_*` classifiers emit 1001 logits with "background" at index 0. V1 and Lite emit 1000.
- V2 `imagenet21k_*` heads have 21843 classes in Google's order (automl `datasets.py`), not 21841.
- V2 `imagenet21k_ft1k_*` heads have 1000 classes (the 1k fine-tuned weights), not 21841.
- `tensorflow/efficientnet/*/classification` ends in Model Garden's `Activation('softmax', name='probs')`, so it
  outputs probabilities, not logits (tensorflow/models `tfhub_export.py`).

Four publications hold the 88 handles (format; whose variable names):

- `google/efficientnet/b0..b7/{feature-vector,classification}/1`: 16, TF1 hub modules; tensorflow/tpu names.
- `tensorflow/efficientnet/b0..b7/{feature-vector,classification}/1`: 16, TF2 SavedModels; Model Garden names.
- `tensorflow/efficientnet/lite0..4/{feature-vector,classification}/2`: 10, TF1 hub modules; tensorflow/tpu names.
- `google/imagenet/efficientnet_v2_imagenet{1k,21k,21k_ft1k}_<size>/{feature_vector,classification}/2`: 46,
  TF2 SavedModels; automl names. 21k and 21k_ft1k exist for B0-B3, S, M, L, XL; 1k for B0-B3, S, M, L.

A record holds the newest version of its handle. `find()` also accepts an older version (V2 v1 required the
`training` argument; Lite v1 stored the normalization as (1, 1, 3) variables) and gives back that version's record.

Keys follow timm's `architecture.tag` and add the signature: `efficientnetv2_m.in21k_ft_in1k.feature_vector`.
V1 is published twice, as the TPU team's TF1 module and as a Model Garden SavedModel, so its tags end in `_tf1`
or `_tf2`, which are also Kaggle's framework names.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import urllib.parse
from dataclasses import dataclass

from effnet.errors import UnknownModelError

# The values each field may take: the catalogue test checks every record against these.
PRETRAININGS = ("imagenet1k", "imagenet21k", "imagenet21k_ft1k")
SIGNATURES = ("feature_vector", "classification")
OUTPUTS = ("features", "logits", "probabilities")
LABELS = ("imagenet1k", "imagenet1k_background", "imagenet21k")
NORMALIZATIONS = ("imagenet_mean_std", "minus_one_to_one_128", "lite_127_128")  # tf_compat.NORMALIZATIONS keys
FORMATS = ("saved_model_2", "hub_tf1", "tflite")
NAME_SCHEMES = ("automl", "model_garden", "tpu")
SOURCE_FORMATS = ("keras_h5", "tpu_checkpoint", "automl_checkpoint")

TFHUB = "https://tfhub.dev/"
KAGGLE = "https://www.kaggle.com/models/"
KAGGLE_DOWNLOAD = "https://www.kaggle.com/api/v1/models/"
# The bucket behind tfhub.dev, serving `<handle>.tar.gz` (found in public scripts, not in the research notes).
TFHUB_GCS = "https://storage.googleapis.com/tfhub-modules/"


@dataclass(frozen=True)
class Source:
    """The same weights published somewhere else, in another format (not a TF Hub module)."""

    url: str
    format: str  # one of SOURCE_FORMATS
    md5: str | None = None  # keras publishes MD5s (keras `file_utils.resolve_hasher`: 32 hex digits = md5)
    sha256: str | None = None
    note: str = ""


@dataclass(frozen=True)
class HubModule:
    """One TF Hub handle: which network, which weights, what goes in and what comes out."""

    handle: str  # tfhub.dev path with version: "google/efficientnet/b2/classification/1"
    key: str  # "efficientnet_b2.aa_in1k_tf1.classification"
    architecture: str  # a name in effnet.architectures.SCALING
    pretraining: str  # one of PRETRAININGS
    signature: str  # one of SIGNATURES
    native_size: int  # the training/eval resolution; the best input size
    fixed_size: bool  # True: the hub module only accepts native_size x native_size (all V2)
    feature_dim: int  # length of the pooled feature vector
    num_classes: int  # classifier width; 0 for feature-vector modules
    labels: str | None  # one of LABELS, None for feature-vector modules
    output: str  # one of OUTPUTS
    normalization: str  # one of NORMALIZATIONS: what the graph does to its [0, 1] input
    format: str  # one of FORMATS
    name_scheme: str  # one of NAME_SCHEMES: whose variable names the artifact uses
    versions: tuple[int, ...]  # every version tfhub.dev published of this handle
    kaggle_path: str  # "<owner>/<model>/<framework>/<variation>", without version
    kaggle_version: int  # Kaggle's number for this record's version (Kaggle renumbered some)
    urls: tuple[str, ...]  # mirrors of the module archive (.tar.gz), tried in order
    sha256: str | None = None  # of the archive; upstream publishes none for TF Hub/Kaggle archives
    other_sources: tuple[Source, ...] = ()

    @property
    def version(self) -> int:
        return int(self.handle.rsplit("/", 1)[1])

    @property
    def unversioned_handle(self) -> str:
        return self.handle.rsplit("/", 1)[0]

    @property
    def tfhub_url(self) -> str:
        return TFHUB + self.handle

    @property
    def kaggle_url(self) -> str:
        return f"{KAGGLE}{self.kaggle_path}/{self.kaggle_version}"

    def at_version(self, version: int) -> HubModule:
        """This handle at another published version (its own handle, Kaggle number and URLs)."""
        if version not in self.versions:
            raise UnknownModelError(
                f"{self.unversioned_handle} has no version {version} on TF Hub; "
                f"published versions: {', '.join(map(str, self.versions))}."
            )
        if version == self.version:
            return self
        handle = f"{self.unversioned_handle}/{version}"
        kaggle_version = _KAGGLE_VERSION[self.versions][version]
        return dataclasses.replace(
            self, handle=handle, kaggle_version=kaggle_version,
            urls=_archive_urls(handle, self.kaggle_path, kaggle_version),
        )


# --- The tables -----------------------------------------------------------------------------------------------

# Kaggle's version number for each tfhub.dev version, by the handle's version history. Handles that started at
# tfhub.dev version 2 start again at 1 on Kaggle: public code loads `imagenet21k-xl-classification/1` and
# `imagenet21k-b3-feature-vector/1`, which tfhub.dev only had as /2 (hub-catalogue.md §2 ◊; verify each once).
_KAGGLE_VERSION: dict[tuple[int, ...], dict[int, int]] = {
    (1,): {1: 1},
    (1, 2): {1: 1, 2: 2},
    (2,): {2: 1},
}

# V1 B0-B7: size -> (native size, pooled feature width = round_filters(1280 * width)); tpu `efficientnet_params`.
V1_SIZES = {
    "b0": (224, 1280), "b1": (240, 1280), "b2": (260, 1408), "b3": (300, 1536),
    "b4": (380, 1792), "b5": (456, 2048), "b6": (528, 2304), "b7": (600, 2560),
}
# V1 is on TF Hub twice, both from the AutoAugment checkpoints:
# (handle prefix, Kaggle prefix, key tag, format, variable names, classifier output)
V1_PUBLICATIONS = (
    # the TPU team's TF1 hub module; card: logits, 1000 classes, index 0 = tench
    ("google/efficientnet", "google/efficientnet/tensorFlow1", "aa_in1k_tf1", "hub_tf1", "tpu", "logits"),
    # Model Garden's Keras export; its graph ends in softmax `probs`, whatever the card says
    ("tensorflow/efficientnet", "tensorflow/efficientnet/tensorFlow2", "aa_in1k_tf2", "saved_model_2",
     "model_garden", "probabilities"),
)
# Lite0-4: the head is fixed at 1280 ("fix the stem and head while scaling"). The sizes are the tpu lite builder's
# `efficientnet_lite_params`; the Lite3/Lite4 cards say 300/380, copied from the B3/B4 cards.
LITE_SIZES = {
    "lite0": (224, 1280), "lite1": (240, 1280), "lite2": (260, 1280), "lite3": (280, 1280), "lite4": (300, 1280),
}
# V2: size -> (native size, feature width, normalization). B0-B3 use V1's scaling and preprocessing (automl
# `effnetv1_autoaug` -> `preprocess_legacy`); S/M/L/XL use (x - 128) / 128 on 0-255 pixels (automl `preprocessing.py`).
V2_SIZES = {
    "b0": (224, 1280, "imagenet_mean_std"),
    "b1": (240, 1280, "imagenet_mean_std"),
    "b2": (260, 1408, "imagenet_mean_std"),
    "b3": (300, 1536, "imagenet_mean_std"),
    "s": (384, 1280, "minus_one_to_one_128"),
    "m": (480, 1280, "minus_one_to_one_128"),
    "l": (480, 1280, "minus_one_to_one_128"),
    "xl": (512, 1280, "minus_one_to_one_128"),
}

# What each V2 pretraining publishes: which sizes, at which tfhub.dev versions, and the classifier head.
# (pretraining, key tag, sizes, tfhub.dev versions, head classes, labels)
V2_PUBLICATIONS = (
    ("imagenet1k", "in1k", ("b0", "b1", "b2", "b3", "s", "m", "l"), (1, 2), 1001, "imagenet1k_background"),
    ("imagenet21k", "in21k", ("s", "m", "l"), (1, 2), 21843, "imagenet21k"),
    ("imagenet21k", "in21k", ("b0", "b1", "b2", "b3", "xl"), (2,), 21843, "imagenet21k"),
    ("imagenet21k_ft1k", "in21k_ft_in1k", ("s", "m", "l"), (1, 2), 1000, "imagenet1k"),
    ("imagenet21k_ft1k", "in21k_ft_in1k", ("b0", "b1", "b2", "b3", "xl"), (2,), 1000, "imagenet1k"),
)

_KERAS_V1 = "https://storage.googleapis.com/keras-applications/"
_KERAS_V2 = "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/"
_TPU_CKPT = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet/"
# keras.applications MD5s (with top, without top): keras `efficientnet.py` / `efficientnet_v2.py` WEIGHTS_HASHES.
KERAS_V1_MD5 = {
    "b0": ("902e53a9f72be733fc0bcb005b3ebbac", "50bc09e76180e00e4465e1a485ddc09d"),
    "b1": ("1d254153d4ab51201f1646940f018540", "74c4e6b3e1f6a1eea24c589628592432"),
    "b2": ("b15cce36ff4dcbd00b6dd88e7857a6ad", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    "b3": ("ffd1fdc53d0ce67064dc6a9c7960ede0", "af6d107764bb5b1abb91932881670226"),
    "b4": ("18c95ad55216b8f92d7e70b3a046e2fc", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    "b5": ("ace28f2a6363774853a83a0b21b9421a", "38879255a25d3c92d5e44e04ae6cec6f"),
    "b6": ("165f6e37dce68623721b423839de8be5", "9ecce42647a20130c1f39a5d4cb75743"),
    "b7": ("8c03f828fec3ef71311cd463b6759d99", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
}
KERAS_V2_MD5 = {
    "b0": ("21ecbf6da12460d5c40bb2f29ceb2188", "893217f2bb855e2983157299931e43ff"),
    "b1": ("069f0534ff22adf035c89e2d9547a9dc", "0e80663031ca32d657f9caa404b6ec37"),
    "b2": ("424e49f28180edbde1e94797771950a7", "1dfe2e7a5d45b6632553a8961ea609eb"),
    "b3": ("1f1fc43bd98a6e4fd8fdfd551e02c7a0", "f6abf7b5849ac99a89b50dd3fd532856"),
    "s": ("e1d88a8495beba45748fedd0cecbe016", "af0682fb74e8c54910f2d4393339c070"),
    "m": ("a3bf6aa3276309f4fc6a34aa114c95cd", "1b8dc055df72dde80d614482840fe342"),
    "l": ("27e6d408b53c7ebc868fefa357689935", "b0b66b5c863aef5b46e8608fe1711615"),
}
# automl checkpoint suffix per pretraining: efficientnetv2-<size><suffix>.tgz (automl README, effnetv2_model.py).
_AUTOML_SUFFIX = {"imagenet1k": "", "imagenet21k": "-21k", "imagenet21k_ft1k": "-21k-ft1k"}

# Handles spell the signature with a hyphen in V1/Lite and an underscore in V2; Kaggle always uses a hyphen.
_HYPHEN = {"feature_vector": "feature-vector", "classification": "classification"}


# --- Building the records from the tables -------------------------------------------------------------------

def _archive_urls(handle: str, kaggle_path: str, kaggle_version: int) -> tuple[str, ...]:
    """Mirrors of one module archive (a .tar.gz of the module folder), in the order they are tried."""
    return (
        f"{KAGGLE_DOWNLOAD}{kaggle_path}/{kaggle_version}/download",
        f"{TFHUB}{handle}?tf-hub-format=compressed",  # what tensorflow_hub itself fetches; redirects to Kaggle
        f"{TFHUB_GCS}{handle}.tar.gz",
    )


def _record(*, unversioned: str, versions: tuple[int, ...], kaggle_path: str, signature: str,
            classes: int, labels: str, classifier_output: str, **fields) -> HubModule:
    """A record at the newest version; `classes`/`labels`/`classifier_output` apply to classifiers only."""
    version = versions[-1]
    handle = f"{unversioned}/{version}"
    kaggle_version = _KAGGLE_VERSION[versions][version]
    is_classifier = signature == "classification"
    return HubModule(
        handle=handle,
        signature=signature,
        num_classes=classes if is_classifier else 0,
        labels=labels if is_classifier else None,
        output=classifier_output if is_classifier else "features",
        versions=versions,
        kaggle_path=kaggle_path,
        kaggle_version=kaggle_version,
        urls=_archive_urls(handle, kaggle_path, kaggle_version),
        **fields,
    )


def _v1_records() -> list[HubModule]:
    records = []
    for handle_prefix, kaggle_prefix, tag, module_format, name_scheme, classifier_output in V1_PUBLICATIONS:
        for size, (native_size, feature_dim) in V1_SIZES.items():
            top_md5, notop_md5 = KERAS_V1_MD5[size]
            for signature in SIGNATURES:
                keras_h5 = (
                    Source(f"{_KERAS_V1}efficientnet{size}.h5", "keras_h5", md5=top_md5,
                           note="keras.applications conversion of the AutoAugment checkpoint (with top)")
                    if signature == "classification" else
                    Source(f"{_KERAS_V1}efficientnet{size}_notop.h5", "keras_h5", md5=notop_md5,
                           note="keras.applications conversion of the AutoAugment checkpoint (no top)")
                )
                tpu_ckpt = Source(f"{_TPU_CKPT}ckptsaug/efficientnet-{size}.tar.gz", "tpu_checkpoint",
                                  note="training checkpoint; use the ExponentialMovingAverage variables")
                records.append(_record(
                    unversioned=f"{handle_prefix}/{size}/{_HYPHEN[signature]}",
                    kaggle_path=f"{kaggle_prefix}/{size}-{_HYPHEN[signature]}",
                    key=f"efficientnet_{size}.{tag}.{signature}",
                    architecture=f"efficientnet_{size}", pretraining="imagenet1k", signature=signature,
                    native_size=native_size, fixed_size=False, feature_dim=feature_dim,
                    normalization="imagenet_mean_std", format=module_format, name_scheme=name_scheme,
                    versions=(1,), classes=1000, labels="imagenet1k", classifier_output=classifier_output,
                    other_sources=(keras_h5, tpu_ckpt),
                ))
    return records


def _lite_records() -> list[HubModule]:
    records = []
    for size, (native_size, feature_dim) in LITE_SIZES.items():
        for signature in SIGNATURES:
            records.append(_record(
                unversioned=f"tensorflow/efficientnet/{size}/{_HYPHEN[signature]}",
                # Kaggle path inferred from the V1 pattern, not seen in public code (hub-catalogue.md §2 ◊).
                kaggle_path=f"tensorflow/efficientnet/tensorFlow1/{size}-{_HYPHEN[signature]}",
                key=f"efficientnet_{size}.in1k.{signature}",
                architecture=f"efficientnet_{size}", pretraining="imagenet1k", signature=signature,
                native_size=native_size, fixed_size=False, feature_dim=feature_dim,
                normalization="lite_127_128", format="hub_tf1", name_scheme="tpu",
                versions=(1, 2), classes=1000, labels="imagenet1k", classifier_output="logits",
                other_sources=(Source(f"{_TPU_CKPT}lite/efficientnet-{size}.tar.gz", "tpu_checkpoint",
                                      note="training checkpoint; use the ExponentialMovingAverage variables"),),
            ))
    return records


def _v2_records() -> list[HubModule]:
    records = []
    for pretraining, tag, sizes, versions, classes, labels in V2_PUBLICATIONS:
        for size in sizes:
            native_size, feature_dim, normalization = V2_SIZES[size]
            for signature in SIGNATURES:
                other_sources = [Source(
                    f"{_TPU_CKPT}v2/efficientnetv2-{size}{_AUTOML_SUFFIX[pretraining]}.tgz", "automl_checkpoint",
                    note="automl training checkpoint; use the ExponentialMovingAverage variables",
                )]
                if pretraining == "imagenet1k":
                    top_md5, notop_md5 = KERAS_V2_MD5[size]
                    stem = f"efficientnetv2-{size}"
                    other_sources.append(
                        Source(f"{_KERAS_V2}{stem}.h5", "keras_h5", md5=top_md5,
                               note="keras.applications 'imagenet' weights, 1000 classes (no background); "
                                    "which automl checkpoint they came from is unverified")
                        if signature == "classification" else
                        Source(f"{_KERAS_V2}{stem}_notop.h5", "keras_h5", md5=notop_md5,
                               note="keras.applications 'imagenet' weights without top; which automl "
                                    "checkpoint they came from is unverified")
                    )
                kaggle_variation = f"{pretraining.replace('_', '-')}-{size}-{_HYPHEN[signature]}"
                records.append(_record(
                    unversioned=f"google/imagenet/efficientnet_v2_{pretraining}_{size}/{signature}",
                    kaggle_path=f"google/efficientnet-v2/tensorFlow2/{kaggle_variation}",
                    key=f"efficientnetv2_{size}.{tag}.{signature}",
                    architecture=f"efficientnetv2_{size}", pretraining=pretraining, signature=signature,
                    native_size=native_size, fixed_size=True, feature_dim=feature_dim,
                    normalization=normalization, format="saved_model_2", name_scheme="automl",
                    versions=versions, classes=classes, labels=labels, classifier_output="logits",
                    other_sources=tuple(other_sources),
                ))
    return records


CATALOGUE: dict[str, HubModule] = {r.handle: r for r in _v1_records() + _lite_records() + _v2_records()}
_BY_KEY: dict[str, HubModule] = {r.key: r for r in CATALOGUE.values()}
_BY_UNVERSIONED: dict[str, HubModule] = {r.unversioned_handle: r for r in CATALOGUE.values()}
# Kaggle (path, version) -> the record at that version; Kaggle paths compare case-insensitively
# (public code spells the framework "tensorFlow2" and "TensorFlow2").
_BY_KAGGLE: dict[tuple[str, int], HubModule] = {
    (r.kaggle_path.lower(), r.at_version(v).kaggle_version): r.at_version(v)
    for r in CATALOGUE.values() for v in r.versions
}
_BY_KAGGLE_PATH: dict[str, HubModule] = {r.kaggle_path.lower(): r for r in CATALOGUE.values()}


# --- Lookup ---------------------------------------------------------------------------------------------------

def list_modules() -> list[str]:
    """Every handle in the catalogue (newest versions), in table order."""
    return list(CATALOGUE)


def find(name_or_url: str) -> HubModule:
    """The record for a handle, a tfhub.dev / Kaggle / GCS URL, or a catalogue key.

    Accepted forms (version optional everywhere; without one you get the newest):
    `google/efficientnet/b2/classification/1`, `https://tfhub.dev/<handle>` (also with `?tf-hub-format=compressed`),
    `https://www.kaggle.com/models/<owner>/<model>/<framework>/<variation>/<version>` (also the
    `/frameworks/<f>/variations/<v>/versions/<n>` form and the `/api/v1/models/.../download` URL),
    `https://storage.googleapis.com/tfhub-modules/<handle>.tar.gz`, and keys like
    `efficientnetv2_m.in21k_ft_in1k.feature_vector`.
    """
    text = name_or_url.strip()
    if text in _BY_KEY:
        return _BY_KEY[text]
    parsed = urllib.parse.urlsplit(text)
    host = parsed.netloc.lower()
    path = parsed.path.strip("/")
    if host.endswith("kaggle.com"):
        found = _find_kaggle(path)
    elif host == "storage.googleapis.com" and path.startswith("tfhub-modules/"):
        found = _find_handle(re.sub(r"\.(tar\.gz|tgz)$", "", path.removeprefix("tfhub-modules/")))
    elif host in ("tfhub.dev", "www.tfhub.dev", "hub.tensorflow.google.cn") or not host:
        found = _find_handle(path)
    else:
        found = None
    if found is not None:
        return found
    raise UnknownModelError(_unknown_message(text))


_VERSION = re.compile(r"^(?P<base>.+)/(?P<version>\d+)$")


def _find_handle(path: str) -> HubModule | None:
    match = _VERSION.match(path)
    base, version = (match["base"], int(match["version"])) if match else (path, None)
    record = _BY_UNVERSIONED.get(base)
    if record is None:
        return None
    return record if version is None else record.at_version(version)


def _find_kaggle(path: str) -> HubModule | None:
    path = path.lower()
    path = path.removeprefix("api/v1/").removesuffix("/download")
    if not path.startswith("models/"):
        return None
    parts = path.removeprefix("models/").split("/")
    # long form: <owner>/<model>/frameworks/<f>/variations/<v>[/versions/<n>]
    if len(parts) >= 6 and parts[2] == "frameworks" and parts[4] == "variations":
        parts = parts[:2] + [parts[3], parts[5]] + (parts[7:8] if parts[6:7] == ["versions"] else [])
    if len(parts) == 5 and parts[4].isdigit():
        found = _BY_KAGGLE.get(("/".join(parts[:4]), int(parts[4])))
        if found is None and "/".join(parts[:4]) in _BY_KAGGLE_PATH:
            record = _BY_KAGGLE_PATH["/".join(parts[:4])]
            known = sorted(r.kaggle_version for (p, _), r in _BY_KAGGLE.items() if p == record.kaggle_path.lower())
            raise UnknownModelError(
                f"Kaggle has no version {parts[4]} of {record.kaggle_path} in effnet's catalogue; "
                f"known versions: {', '.join(map(str, known))} (tfhub.dev handle {record.unversioned_handle})."
            )
        return found
    if len(parts) == 4:
        return _BY_KAGGLE_PATH.get("/".join(parts))
    return None


def _unknown_message(text: str) -> str:
    names = list(_BY_KEY) + list(_BY_UNVERSIONED)
    # compare like with like: a URL's path against handles, a key against keys
    probe = urllib.parse.urlsplit(text).path.strip("/") if "://" in text else text
    probe = _VERSION.sub(r"\g<base>", probe)
    # suggest full handles (with their newest version) so that the suggestion can be pasted back
    close = [_BY_UNVERSIONED[name].handle if name in _BY_UNVERSIONED else name
             for name in difflib.get_close_matches(probe, names, n=3, cutoff=0.6)]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"{text!r} is not an EfficientNet module effnet knows.{hint} "
        "Pass a TF Hub handle (google/efficientnet/b0/feature-vector/1), a tfhub.dev or Kaggle URL, or a key "
        "(efficientnet_b0.aa_in1k_tf1.feature_vector); effnet.catalogue.list_modules() lists all of them."
    )
