//! Coordinators started in the test process through `coordinator::start`:
//! the bound addresses come back from the call, and `supervise` shuts down
//! in order when told to.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn start_returns_the_bound_addresses_and_stop_ends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("muster.db");
    let mut extra = FAST_TIMING.to_vec();
    extra.extend(["--metrics-listen", "127.0.0.1:0"]);
    let coordinator = InProcessCoordinator::start(&db, &extra).await;
    assert_ne!(coordinator.address.port(), 0);
    let metrics = coordinator.metrics_address.expect("metrics were asked for");
    assert_ne!(metrics.port(), 0);
    tokio::net::TcpStream::connect(metrics)
        .await
        .expect("the metrics port is bound");

    let (stream, _) =
        RawStream::register(&coordinator.url(), "gpu-1", "http://127.0.0.1:9", "boot").await;
    coordinator.stop().await.expect("a clean shutdown");
    assert_eq!(stored_node_ids(&db).await, vec!["gpu-1".to_owned()]);
    drop(stream);
}
