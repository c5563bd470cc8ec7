"""What every layer may use, and which imports nothing else of choicelm:

    config       grouped dataclass configs: YAML, --section.key=value, validated on construction
    errors       ChoicelmError, the one exception type for bad input
    runtime      device, precision (bf16 autocast) and allocator choices
    checkpoint   checkpoints that are complete or absent: atomic write, COMPLETE marker, resolve, read config
"""

__version__ = "0.1.0"
