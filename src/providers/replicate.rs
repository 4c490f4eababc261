//! The `replicate` kind. (Skeleton: filled in by the adapter work of issue 6.)

use super::Upstream;

pub struct Replicate {
    up: Upstream,
}

impl Replicate {
    pub fn new(up: Upstream) -> Self {
        Replicate { up }
    }
}

#[async_trait::async_trait]
impl super::GenerateAdapter for Replicate {
    async fn generate(&self, _spec: &super::GenerationSpec, _route: &super::RouteCall<'_>) -> Result<Vec<super::GeneratedMedia>, crate::error::UpstreamError> {
        Err(self.up.err(crate::error::UpstreamErrorKind::Unsupported, "not yet"))
    }
}
