//! Graceful shutdown on SIGINT / SIGTERM.

/// Resolves on the first SIGINT or SIGTERM, naming it. A second signal while
/// shutting down exits at once, for the impatient.
pub async fn signal() -> &'static str {
    let first = wait_for_signal().await;
    tokio::spawn(async {
        let second = wait_for_signal().await;
        tracing::warn!(
            signal = second,
            "second signal during shutdown, exiting now"
        );
        std::process::exit(130);
    });
    first
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
