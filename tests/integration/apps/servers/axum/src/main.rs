//! axum on the socket the launcher passes (LISTEN_FDS, fd 3), through listenfd; drains on
//! SIGTERM (axum's graceful shutdown).

use tokio::signal::unix::{signal, SignalKind};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let std_listener = listenfd::ListenFd::from_env()
        .take_tcp_listener(0)
        .expect("LISTEN_FDS")
        .expect("no socket at fd 3");
    std_listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { format!("hello from pid {}\n", std::process::id()) }),
    );
    let mut term = signal(SignalKind::terminate()).unwrap();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await
        .unwrap();
}
