//! `coordctl`: the coordkit command line (see [`coordkit::cli`]).

#[tokio::main]
async fn main() {
    coordkit::cli::main().await;
}
