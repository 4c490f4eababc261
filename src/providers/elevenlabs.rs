//! The `elevenlabs` kind. (Skeleton: filled in by the adapter work of issue 6.)

use super::Upstream;

pub struct ElevenLabs {
    up: Upstream,
}

impl ElevenLabs {
    pub fn new(up: Upstream) -> Self {
        ElevenLabs { up }
    }
}

#[async_trait::async_trait]
impl super::TtsAdapter for ElevenLabs {
    fn supports(&self, _format: super::AudioFormat, _sample_rate: u32) -> bool {
        false
    }

    async fn synthesize(&self, _spec: &super::SpeechSpec, _route: &super::RouteCall<'_>) -> Result<super::ByteStream, crate::error::UpstreamError> {
        Err(self.up.err(crate::error::UpstreamErrorKind::Unsupported, "not yet"))
    }
}
