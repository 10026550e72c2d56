"""A video is a source of the image and audio modalities: key frames and its sound track.

Decoded with PyAV (FFmpeg). Key frames only (`skip_frame = NONKEY`: the decoder never builds the
frames between them), at most `frames` of them evenly spread over the clip, each handed to the
image encoder as PNG bytes so it takes the same checks as any image; the sound track, mono, up
to `max_seconds`, handed to the audio encoder as WAV bytes. The item's vectors are the mean of
its frames' vectors (streams/catalog.py); an item's own `image` or `audio` comes first.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import soundfile as sf

from streams.media import MediaError

# Key frames looked at before choosing: a long clip with many key frames is not decoded whole.
MAX_KEY_FRAMES = 256


@dataclass(frozen=True)
class Clip:
    frames: list[bytes]  # PNG
    audio: bytes | None  # WAV, None when the clip has no sound track


def split_video(data: bytes, frames: int, max_seconds: float, max_pixels: int) -> Clip:
    """Key frames and sound track of a video file's bytes, or MediaError saying why not."""
    try:
        return Clip(_key_frames(data, frames, max_pixels), _sound(data, max_seconds))
    except MediaError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise MediaError(f"video cannot be decoded: {type(exc).__name__}: {exc}") from exc


def _key_frames(data: bytes, wanted: int, max_pixels: int) -> list[bytes]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise MediaError("video has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONKEY"
        keys = []
        for frame in container.decode(stream):
            if frame.width * frame.height > max_pixels:
                raise MediaError(
                    f"video frames are {frame.width}x{frame.height}, over {max_pixels} pixels"
                )
            keys.append(frame)
            if len(keys) >= MAX_KEY_FRAMES:
                break
    if not keys:
        raise MediaError("video has no decodable frame")
    chosen = np.unique(np.linspace(0, len(keys) - 1, min(wanted, len(keys))).round().astype(int))
    out = []
    for j in chosen:
        png = io.BytesIO()
        keys[j].to_image().save(png, format="PNG")
        out.append(png.getvalue())
    return out


def _sound(data: bytes, max_seconds: float) -> bytes | None:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        # One format whatever the codec: mono float32 at the track's own rate.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks, total = [], 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunk = out.to_ndarray().reshape(-1)
                chunks.append(chunk)
                total += len(chunk)
            if total >= max_seconds * rate:
                break
    if not chunks:
        return None
    samples = np.concatenate(chunks)[: int(max_seconds * rate)]
    wav = io.BytesIO()
    sf.write(wav, samples, rate, format="WAV", subtype="FLOAT")
    return wav.getvalue()
