//! Container health checks: each replica names itself in a file, and the
//! check pings that replica, not whichever of its service answers first.

use super::INSTANCE_FILE_ENV;

/// Writes this instance's id where [`healthcheck`] reads it, so a container
/// checks its own replica, not whichever answers first. Written whole, then
/// renamed: a health check never reads half an id.
pub(super) fn write_instance_file(path: &std::path::Path, id: &str) {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, id).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "instance id not written; the health check will ping any replica");
    }
}

/// A container health check: pings this container's own instance (named in
/// the [`INSTANCE_FILE_ENV`] file, which the service writes when it starts) or,
/// without one, any instance of `name`. Returns whether it answered within two
/// seconds.
pub async fn healthcheck(cfg: &crate::config::NatsConfig, name: &str) -> bool {
    let id = std::env::var_os(INSTANCE_FILE_ENV).and_then(|p| std::fs::read_to_string(p).ok());
    ping(cfg, name, id.as_deref().map(str::trim)).await
}

/// Whether instance `id` of service `name` (any instance, without an id)
/// answers a ping within two seconds.
pub async fn ping(cfg: &crate::config::NatsConfig, name: &str, id: Option<&str>) -> bool {
    let mut subject = format!("{}.{name}", crate::subject::SRV_PING);
    if let Some(id) = id {
        subject = format!("{subject}.{id}");
    }
    let check = async {
        let client = crate::nats::connect(cfg, "healthcheck").await.ok()?;
        client.request(subject, "".into()).await.ok()
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(2), check).await,
        Ok(Some(_))
    )
}
