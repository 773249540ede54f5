"""The device simulator: seeded recording chains (:mod:`.chain`) and corpora built with them (:mod:`.corpus`).

See ``docs/simulator.md``.
"""

from devrecd.synth.chain import DeviceChain, SynthError, Variation, render, sample_model, sample_unit
from devrecd.synth.corpus import SynthSettings, generate, make_devices, scan_speech, speaker_of, split_speakers

__all__ = [
    "DeviceChain", "SynthError", "SynthSettings", "Variation", "generate", "make_devices", "render",
    "sample_model", "sample_unit", "scan_speech", "speaker_of", "split_speakers",
]
