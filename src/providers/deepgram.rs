//! The `deepgram` kind. (Skeleton: filled in by the adapter work of issue 6.)

use super::Upstream;

pub struct Deepgram {
    up: Upstream,
}

impl Deepgram {
    pub fn new(up: Upstream) -> Self {
        Deepgram { up }
    }
}

#[async_trait::async_trait]
impl super::SttAdapter for Deepgram {
    async fn transcribe(&self, _audio: &super::AudioUpload, _route: &super::RouteCall<'_>) -> Result<super::Transcript, crate::error::UpstreamError> {
        Err(self.up.err(crate::error::UpstreamErrorKind::Unsupported, "not yet"))
    }
}
