"""Reading a data folder: find the classes and files, split them, decode the images.

`scan_image_folder` lists classes and image files (flat or train/val/test layout) without
decoding; `complete_splits` makes the seeded, stratified splits the folder does not provide and
`write_split` records them; `decode_images` decodes the files with the one hardened loader,
`load_image`, reporting and skipping files that cannot be decoded.
"""

from finetune.data.decode import (
    IMAGE_EXTENSIONS,
    INTERPOLATIONS,
    MAX_IMAGE_PIXELS,
    BadFile,
    decode_images,
    is_image_file,
    load_image,
)
from finetune.data.scan import (
    SPLIT_NAMES,
    IgnoredFile,
    ImageFolder,
    Sample,
    check_classes,
    scan_image_folder,
)
from finetune.data.split import (
    DEFAULT_FRACTIONS,
    SPLIT_FILE_FORMAT,
    SplitFile,
    complete_splits,
    read_split,
    stratified_split,
    write_split,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "MAX_IMAGE_PIXELS",
    "SPLIT_FILE_FORMAT",
    "SPLIT_NAMES",
    "BadFile",
    "IgnoredFile",
    "ImageFolder",
    "Sample",
    "SplitFile",
    "check_classes",
    "complete_splits",
    "decode_images",
    "is_image_file",
    "load_image",
    "read_split",
    "scan_image_folder",
    "stratified_split",
    "write_split",
]
