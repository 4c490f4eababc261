//! What the media kinds are made of, all deterministic: PNG images, MP4
//! videos and audio in the formats the TTS APIs offer; the stateless
//! `GET /_sim/media/{token}` that serves images and videos by URL; and the
//! transcript the speech-to-text kinds derive from the audio bytes.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::Path,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{answer_words, splitmix64, stream_frames, Faults, Frame, SimState};

/// FNV-1a of `data`, starting from `seed`.
pub(super) fn hash64(seed: u64, data: &[u8]) -> u64 {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// `n` bytes of noise drawn from `h`.
pub(super) fn filler(h: u64, n: usize) -> Vec<u8> {
    let mut out: Vec<u8> = (0..n.div_ceil(8) as u64).flat_map(|i| splitmix64(h.wrapping_add(i)).to_le_bytes()).collect();
    out.truncate(n);
    out
}

/// Lowercase hex of `bytes`.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A UUID-shaped id drawn from `h`.
pub(super) fn uuid(h: u64) -> String {
    let a = hex(&splitmix64(h).to_be_bytes());
    let b = hex(&splitmix64(h ^ 0x5555).to_be_bytes());
    format!("{}-{}-4{}-a{}-{}", &a[..8], &a[8..12], &a[13..16], &b[1..4], &b[4..16])
}

/// Seconds since the epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// `2024-05-01T12:00:00.123456Z`
pub(super) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros())
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

// ---------------------------------------------------------------- images

/// The largest image side the simulator draws.
pub(super) const MAX_SIDE: u32 = 16_384;

/// A colour drawn from `h`.
pub(super) fn color(h: u64) -> [u8; 3] {
    let [r, g, b, ..] = splitmix64(h).to_le_bytes();
    [r, g, b]
}

/// A valid PNG of `width` x `height` in one colour: a one-entry palette,
/// one bit per pixel, every pixel index 0. Its IDAT is a single
/// fixed-Huffman deflate block of back-references, so even a 16384-pixel
/// square is a few hundred KiB.
pub(super) fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let (w, h) = (width.clamp(1, MAX_SIDE), height.clamp(1, MAX_SIDE));
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    // Bit depth 1, colour type 3 (palette), deflate, no filter, no interlace.
    ihdr.extend_from_slice(&[1, 3, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"PLTE", &rgb);
    // Each scanline: filter byte 0, then ceil(w / 8) bytes of index 0.
    let raw = u64::from(h) * (1 + u64::from(w.div_ceil(8)));
    png_chunk(&mut out, b"IDAT", &zlib_zeros(raw));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (ISO-HDLC), as PNG chunks carry.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A deflate bit stream: values least significant bit first, Huffman codes
/// most significant bit first.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, bits: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A literal/length symbol in the fixed Huffman code (RFC 1951 3.2.6).
    fn symbol(&mut self, sym: u32) {
        let (code, bits) = match sym {
            0..=143 => (0x30 + sym, 8),
            144..=255 => (0x190 + sym - 144, 9),
            256..=279 => (sym - 256, 7),
            _ => (0xC0 + sym - 280, 8),
        };
        self.put(code.reverse_bits() >> (32 - bits), bits);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// `len` zero bytes as a zlib stream: a literal 0, then matches at
/// distance 1.
fn zlib_zeros(len: u64) -> Vec<u8> {
    const BASE: [u32; 29] = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
    const EXTRA: [u32; 29] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
    // CMF 0x78 (deflate, 32 KiB window), FLG 0x01 (check bits, level 0).
    let mut bits = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE 01: fixed Huffman
    let mut left = len;
    if left > 0 {
        bits.symbol(0);
        left -= 1;
    }
    while left >= 3 {
        let run = left.min(258) as u32;
        let i = BASE.iter().rposition(|&b| b <= run).unwrap_or(0);
        bits.symbol(257 + i as u32);
        bits.put(run - BASE[i], EXTRA[i]);
        bits.put(0, 5); // distance code 0: distance 1
        left -= u64::from(run);
    }
    for _ in 0..left {
        bits.symbol(0);
    }
    bits.symbol(256);
    let mut out = bits.finish();
    // Adler-32 of zeros: a stays 1, b grows by one a byte.
    let adler = (((len % 65_521) as u32) << 16) | 1;
    out.extend_from_slice(&adler.to_be_bytes());
    out
}

/// A plausible MP4: an `ftyp` box (`mp42`, compatible `mp42` `isom`) and
/// an `mdat` box of noise drawn from `h`.
pub(super) fn mp4(h: u64) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0x18];
    out.extend_from_slice(b"ftypmp42");
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(b"mp42isom");
    let payload = filler(h, 4096);
    out.extend_from_slice(&((payload.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(b"mdat");
    out.extend(payload);
    out
}

/// The token of a `/_sim/media/` URL serving a PNG: `img-{w}x{h}-{rrggbb}.png`.
pub(super) fn image_token(width: u32, height: u32, rgb: [u8; 3]) -> String {
    format!("img-{width}x{height}-{}.png", hex(&rgb))
}

/// The token of a `/_sim/media/` URL serving an MP4: `vid-{hex}.mp4`.
pub(super) fn video_token(h: u64) -> String {
    format!("vid-{h:016x}.mp4")
}

/// Parses `WxH` (an image size).
pub(super) fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let (w, h) = (w.parse().ok()?, h.parse().ok()?);
    ((1..=MAX_SIDE).contains(&w) && (1..=MAX_SIDE).contains(&h)).then_some((w, h))
}

fn media_of(token: &str) -> Option<(&'static str, Vec<u8>)> {
    if let Some(rest) = token.strip_prefix("img-").and_then(|t| t.strip_suffix(".png")) {
        let (size, rgb) = rest.split_once('-')?;
        let (w, h) = parse_size(size)?;
        let rgb = u32::from_str_radix(rgb, 16).ok().filter(|_| rgb.len() == 6)?;
        let [_, r, g, b] = rgb.to_be_bytes();
        return Some(("image/png", png(w, h, [r, g, b])));
    }
    let h = token.strip_prefix("vid-").and_then(|t| t.strip_suffix(".mp4"))?;
    Some(("video/mp4", mp4(u64::from_str_radix(h, 16).ok()?)))
}

/// `GET /_sim/media/{token}`: the image or video the token names.
pub(super) async fn serve(Path(token): Path<String>) -> Response {
    match media_of(&token) {
        Some((content_type, bytes)) => ([(http::header::CONTENT_TYPE, content_type)], bytes).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": format!("no such media: {token}")}))).into_response(),
    }
}

// ----------------------------------------------------------------- audio

/// An audio encoding a TTS API answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Audio {
    Mp3,
    Opus,
    Aac,
    Flac,
    /// WAV at this sample rate.
    Wav(u32),
    Pcm,
    Ulaw,
}

/// The size of each streamed audio chunk.
pub(super) const AUDIO_CHUNK: usize = 1024;

impl Audio {
    pub fn content_type(self) -> &'static str {
        match self {
            Audio::Mp3 => "audio/mpeg",
            Audio::Opus => "audio/opus",
            Audio::Aac => "audio/aac",
            Audio::Flac => "audio/flac",
            Audio::Wav(_) => "audio/wav",
            Audio::Pcm => "audio/pcm",
            Audio::Ulaw => "audio/basic",
        }
    }

    /// The bytes a file of `total` bytes starts with.
    fn header(self, total: usize) -> Vec<u8> {
        match self {
            // An ID3v2.4 tag with no frames, then an MPEG-1 layer III frame header.
            Audio::Mp3 => vec![b'I', b'D', b'3', 4, 0, 0, 0, 0, 0, 0, 0xFF, 0xFB, 0x90, 0x64],
            Audio::Wav(rate) => {
                let mut h = b"RIFF".to_vec();
                h.extend_from_slice(&(total.saturating_sub(8) as u32).to_le_bytes());
                h.extend_from_slice(b"WAVEfmt ");
                h.extend_from_slice(&16u32.to_le_bytes());
                h.extend_from_slice(&1u16.to_le_bytes()); // PCM
                h.extend_from_slice(&1u16.to_le_bytes()); // mono
                h.extend_from_slice(&rate.to_le_bytes());
                h.extend_from_slice(&(rate * 2).to_le_bytes());
                h.extend_from_slice(&2u16.to_le_bytes());
                h.extend_from_slice(&16u16.to_le_bytes());
                h.extend_from_slice(b"data");
                h.extend_from_slice(&(total.saturating_sub(44) as u32).to_le_bytes());
                h
            }
            Audio::Opus => {
                // The first Ogg page: beginning of stream, one OpusHead packet.
                let mut head = b"OpusHead".to_vec();
                head.extend_from_slice(&[1, 1]); // version, mono
                head.extend_from_slice(&312u16.to_le_bytes()); // pre-skip
                head.extend_from_slice(&48_000u32.to_le_bytes());
                head.extend_from_slice(&[0, 0, 0]); // gain, mapping family
                let mut page = b"OggS".to_vec();
                page.extend_from_slice(&[0, 2]);
                page.extend_from_slice(&[0; 8]); // granule position
                page.extend_from_slice(b"sim\0"); // serial
                page.extend_from_slice(&[0; 4]); // sequence
                page.extend_from_slice(&[0; 4]); // checksum, filled below
                page.extend_from_slice(&[1, head.len() as u8]);
                page.extend(head);
                let crc = ogg_crc(&page);
                page[22..26].copy_from_slice(&crc.to_le_bytes());
                page
            }
            Audio::Flac => {
                let mut h = b"fLaC".to_vec();
                h.extend_from_slice(&[0x80, 0, 0, 34]); // last block: STREAMINFO, 34 bytes
                h.extend_from_slice(&4096u16.to_be_bytes());
                h.extend_from_slice(&4096u16.to_be_bytes());
                h.extend_from_slice(&[0; 6]); // frame sizes unknown
                // 20 bits rate, 3 bits channels - 1, 5 bits bits/sample - 1, 36 bits samples.
                let samples = (total / 2) as u64;
                let packed = (24_000u64 << 44) | (15u64 << 36) | (samples & 0xF_FFFF_FFFF);
                h.extend_from_slice(&packed.to_be_bytes());
                h.extend_from_slice(&[0; 16]); // MD5 unknown
                h
            }
            // An ADTS header: MPEG-4 AAC LC, 24 kHz, mono.
            Audio::Aac => vec![0xFF, 0xF1, 0x58, 0x40, 0x80, 0x1F, 0xFC],
            Audio::Pcm | Audio::Ulaw => vec![],
        }
    }
}

/// The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, unreflected).
fn ogg_crc(data: &[u8]) -> u32 {
    let mut c = 0u32;
    for &b in data {
        c ^= u32::from(b) << 24;
        for _ in 0..8 {
            c = if c & 0x8000_0000 != 0 { (c << 1) ^ 0x04C1_1DB7 } else { c << 1 };
        }
    }
    c
}

/// Chunks of speech for `chars` characters of text: one per 16, at least 4.
pub(super) fn audio_chunks(chars: usize) -> usize {
    chars.div_ceil(16).max(4)
}

/// `chunks` chunks of audio of [`AUDIO_CHUNK`] bytes drawn from `h`, the
/// first starting with the format's header.
pub(super) fn audio_bytes(format: Audio, h: u64, chunks: usize) -> Vec<Bytes> {
    let total = chunks * AUDIO_CHUNK;
    let mut bytes = filler(h, total);
    for (b, m) in bytes.iter_mut().zip(format.header(total)) {
        *b = m;
    }
    bytes.chunks(AUDIO_CHUNK).map(Bytes::copy_from_slice).collect()
}

/// Streams audio, one content event per chunk, with the stream faults.
pub(super) fn audio_response(state: Arc<SimState>, format: Audio, h: u64, chunks: usize, faults: Faults) -> Response {
    let frames = audio_bytes(format, h, chunks).into_iter().map(Frame::content).collect();
    let mut resp = stream_frames(state, frames, faults, b"\0\0simulated corruption\0\0");
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(format.content_type()));
    resp
}

// ------------------------------------------------------------ transcripts

/// What the speech-to-text kinds hear in some audio.
pub(super) struct Transcript {
    pub words: Vec<&'static str>,
    /// Seconds, as 16 kHz 16-bit mono: bytes / 32000, to 2 decimals.
    pub duration: f64,
    /// Unrounded, for billing by the second.
    pub exact_duration: f64,
    /// Lowercase hex SHA-256 of the audio.
    pub sha256: String,
}

pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn capitalise(w: &str) -> String {
    let mut c = w.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

impl Transcript {
    /// `n` words from the seed and the audio's hash.
    pub fn of(seed: u64, audio: &[u8], n: u32) -> Transcript {
        let sha256 = hex(&Sha256::digest(audio));
        let exact_duration = audio.len() as f64 / 32_000.0;
        Transcript {
            words: answer_words(seed, &sha256, n),
            duration: round2(exact_duration),
            exact_duration,
            sha256,
        }
    }

    /// The words as a sentence: capitalised, ending with a full stop.
    pub fn text(&self) -> String {
        self.punctuated().join(" ")
    }

    /// Each word as it appears in [`Transcript::text`].
    pub fn punctuated(&self) -> Vec<String> {
        let last = self.words.len().saturating_sub(1);
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let w = if i == 0 { capitalise(w) } else { (*w).to_owned() };
                if i == last {
                    format!("{w}.")
                } else {
                    w
                }
            })
            .collect()
    }

    /// Each word's start and end, spread evenly over the duration.
    pub fn timings(&self) -> Vec<(f64, f64)> {
        let n = self.words.len().max(1) as f64;
        let step = self.duration / n;
        (0..self.words.len()).map(|i| (round2(i as f64 * step), round2((i + 1) as f64 * step))).collect()
    }
}

/// The lowercase English name of an ISO-639-1 code, as OpenAI's
/// `verbose_json` reports it; an unknown code is returned as given.
pub(super) fn language_name(code: &str) -> String {
    let name = match code.to_ascii_lowercase().as_str() {
        "en" => "english",
        "de" => "german",
        "fr" => "french",
        "es" => "spanish",
        "it" => "italian",
        "pt" => "portuguese",
        "nl" => "dutch",
        "ja" => "japanese",
        "zh" => "chinese",
        "ko" => "korean",
        "ru" => "russian",
        "pl" => "polish",
        "sv" => "swedish",
        "da" => "danish",
        "no" => "norwegian",
        "fi" => "finnish",
        "tr" => "turkish",
        "uk" => "ukrainian",
        "cs" => "czech",
        "el" => "greek",
        "ar" => "arabic",
        "he" => "hebrew",
        "hi" => "hindi",
        "id" => "indonesian",
        "vi" => "vietnamese",
        "th" => "thai",
        _ => return code.to_owned(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_carries_its_size_and_valid_crcs() {
        let p = png(640, 480, [1, 2, 3]);
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&p[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(p[16..20].try_into().unwrap()), 640);
        assert_eq!(u32::from_be_bytes(p[20..24].try_into().unwrap()), 480);
        // Every chunk's CRC covers its type and data.
        let mut at = 8;
        let mut kinds = vec![];
        while at < p.len() {
            let len = u32::from_be_bytes(p[at..at + 4].try_into().unwrap()) as usize;
            let crc = u32::from_be_bytes(p[at + 8 + len..at + 12 + len].try_into().unwrap());
            assert_eq!(crc, crc32(&p[at + 4..at + 8 + len]));
            kinds.push(String::from_utf8(p[at + 4..at + 8].to_vec()).unwrap());
            at += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "PLTE", "IDAT", "IEND"]);
        assert!(png(MAX_SIDE, MAX_SIDE, [0; 3]).len() < 512 * 1024);
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn media_tokens_round_trip() {
        let (ct, bytes) = media_of(&image_token(64, 32, [0xab, 0xcd, 0xef])).unwrap();
        assert_eq!(ct, "image/png");
        assert_eq!(bytes, png(64, 32, [0xab, 0xcd, 0xef]));
        let (ct, bytes) = media_of(&video_token(99)).unwrap();
        assert_eq!(ct, "video/mp4");
        assert_eq!(&bytes[..12], b"\0\0\0\x18ftypmp42");
        assert!(media_of("img-0x0-000000.png").is_none());
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + std::time::Duration::from_micros(1_709_251_199_500_000)), "2024-02-29T23:59:59.500000Z");
    }

    #[test]
    fn audio_starts_with_magic_bytes() {
        let first = |f| audio_bytes(f, 1, 4)[0].clone();
        assert!(first(Audio::Mp3).starts_with(b"ID3"));
        let wav = first(Audio::Wav(24_000));
        assert!(wav.starts_with(b"RIFF") && &wav[8..12] == b"WAVE");
        assert!(first(Audio::Opus).starts_with(b"OggS"));
        assert!(first(Audio::Flac).starts_with(b"fLaC"));
        assert!(first(Audio::Aac).starts_with(&[0xFF, 0xF1]));
        assert_eq!(audio_bytes(Audio::Pcm, 1, 5).iter().map(Bytes::len).sum::<usize>(), 5 * AUDIO_CHUNK);
    }
}
