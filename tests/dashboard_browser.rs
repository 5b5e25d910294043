//! The dashboard in a real browser: Debian's headless `chromium`, driven
//! through `chromedriver` (WebDriver) by fantoccini, against a coordinator
//! and two agents. It logs in, watches nodes come ONLINE, turn OFFLINE
//! within 2 s of their agent being killed (with no reload), show a drain's
//! reason, turn LEFT when their agent leaves, and come back to the truth by
//! itself after the coordinator restarts. It saves a screenshot under
//! `target/`.
//!
//! Without `chromium` and `chromedriver` it prints one SKIPPED line; with
//! `CI=true` that is a failure (`.ci/run` installs both).

mod common;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use muster::proto;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
/// The bound: a killed agent is OFFLINE on the page within this.
const OFFLINE_ON_PAGE: Duration = Duration::from_secs(2);
/// Browser start-up, page loads and reconnects on a loaded machine.
const BROWSER_DEADLINE: Duration = Duration::from_secs(30);
const CHROMEDRIVER_ATTEMPTS: usize = 5;

const INSTALL: &str = "apt-get install -y chromium chromium-driver";

/// chromedriver, killed when dropped; it serves WebDriver once it
/// accepts connections.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago: chromedriver takes its port as a
/// flag, so it is probed here and a start that loses the race is retried.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_chromedriver() -> Chromedriver {
    let mut failures = Vec::new();
    for _ in 0..CHROMEDRIVER_ATTEMPTS {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let mut driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = Instant::now();
        while started.elapsed() < START_DEADLINE {
            if let Some(status) = driver.child.try_wait().unwrap() {
                failures.push(format!("chromedriver on port {port} exited: {status}"));
                break;
            }
            if tokio::net::TcpStream::connect(address).await.is_ok() {
                return driver;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failures.push(format!("chromedriver on port {port} never became ready"));
    }
    panic!("chromedriver did not start: {failures:?}");
}

async fn open_browser(driver: &Chromedriver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,720",
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("chromium started through chromedriver")
}

/// Each row of the page's node table: node id, state, drain reason (empty
/// when not drained).
async fn table(browser: &Client) -> Vec<(String, String, String)> {
    let rows = browser
        .execute(
            "return Array.from(document.querySelectorAll('#nodes tbody tr')).map(row => [
                row.dataset.nodeId,
                row.dataset.state,
                row.querySelector('.badge.drained') ? row.querySelector('.drain-reason').textContent : '',
            ]);",
            vec![],
        )
        .await
        .expect("read the table");
    serde_json::from_value(rows).expect("rows of three strings")
}

async fn connection_state(browser: &Client) -> String {
    browser
        .execute(
            "return document.getElementById('connection').dataset.state;",
            vec![],
        )
        .await
        .expect("read the connection badge")
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until the page's row for `node_id` is in `state`; how long it took.
async fn wait_for_row(
    browser: &Client,
    node_id: &str,
    state: &str,
    deadline: Duration,
) -> Duration {
    let started = Instant::now();
    wait_for(
        &format!("{node_id} {state} on the page"),
        deadline,
        || async {
            let rows = table(browser).await;
            rows.iter()
                .any(|(id, shown, _)| id == node_id && shown == state)
                .then_some(())
        },
    )
    .await;
    started.elapsed()
}

/// The table as ListNodes tells the truth, in the page's terms.
async fn truth(url: &str) -> Vec<(String, String, String)> {
    let mut client = connect(url).await.expect("connect");
    let mut request = tonic::Request::new(proto::ListNodesRequest {});
    bearer(&mut request);
    let mut rows: Vec<_> = client
        .list_nodes(request)
        .await
        .expect("list nodes")
        .into_inner()
        .nodes
        .into_iter()
        .map(|node| {
            (
                node.node_id.clone(),
                muster::wire::json::state_name(node.state).to_owned(),
                if node.drained {
                    node.drain_reason
                } else {
                    String::new()
                },
            )
        })
        .collect();
    rows.sort();
    rows
}

fn bearer<T>(request: &mut tonic::Request<T>) {
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
}

/// Marks the page so that a reload (which would clear it) is noticed.
async fn mark_page(browser: &Client) {
    browser
        .execute("window.musterNotReloaded = true; return true;", vec![])
        .await
        .expect("mark the page");
}

async fn assert_not_reloaded(browser: &Client) {
    let marked = browser
        .execute("return window.musterNotReloaded === true;", vec![])
        .await
        .expect("read the mark");
    assert_eq!(marked, Value::Bool(true), "the page was reloaded");
}

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_follows_the_fleet_live_in_a_real_browser() {
    let what = "the real-browser dashboard test";
    if !tool_available(&["chromium", "--version"], INSTALL, what)
        || !tool_available(&["chromedriver", "--version"], INSTALL, what)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let db = dir.path().join("muster.db");
    let token_flag = ["--admin-token-file", token_file.to_str().unwrap()];
    let extra = [FAST_TIMING, &token_flag, &EPHEMERAL_HTTP].concat();
    let coordinator = Coordinator::start(&db, "127.0.0.1:0", &extra);
    let grpc_address = coordinator.process.address.to_string();
    let http_address = coordinator.http_address();
    let url = coordinator.url();
    let _gpu1 = start_agent(&url, "gpu-1", &dir.path().join("gpu-1"));
    let mut gpu2 = start_agent(&url, "gpu-2", &dir.path().join("gpu-2"));

    let driver = start_chromedriver().await;
    let browser = open_browser(&driver).await;
    browser
        .goto(&format!("http://{http_address}/"))
        .await
        .expect("open the dashboard");
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/login"),
        "without the token the page sends the browser to log in"
    );
    let token_input = browser
        .find(Locator::Id("token"))
        .await
        .expect("login form");
    token_input.send_keys(ADMIN_TOKEN).await.unwrap();
    browser
        .find(Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    for node in ["gpu-1", "gpu-2"] {
        wait_for_row(&browser, node, "ONLINE", BROWSER_DEADLINE).await;
    }
    wait_for("the page to be live", BROWSER_DEADLINE, || async {
        (connection_state(&browser).await == "live").then_some(())
    })
    .await;
    mark_page(&browser).await;

    gpu2.kill();
    let took = wait_for_row(&browser, "gpu-2", "OFFLINE", OFFLINE_ON_PAGE).await;
    say(&format!(
        "a killed agent was OFFLINE on the page after {took:?}"
    ));
    assert_not_reloaded(&browser).await;

    let mut request = tonic::Request::new(proto::DrainNodeRequest {
        node_id: "gpu-1".into(),
        reason: "swapping a fan".into(),
    });
    bearer(&mut request);
    connect(&url)
        .await
        .unwrap()
        .drain_node(request)
        .await
        .expect("drained");
    wait_for(
        "the drain's reason on the page",
        BROWSER_DEADLINE,
        || async {
            table(&browser)
                .await
                .iter()
                .any(|(id, _, reason)| id == "gpu-1" && reason == "swapping a fan")
                .then_some(())
        },
    )
    .await;

    let gpu2 = start_agent(&url, "gpu-2", &dir.path().join("gpu-2"));
    wait_for_row(&browser, "gpu-2", "ONLINE", BROWSER_DEADLINE).await;
    gpu2.stop_with(Signal::SIGTERM, START_DEADLINE);
    wait_for_row(&browser, "gpu-2", "LEFT", BROWSER_DEADLINE).await;
    assert_not_reloaded(&browser).await;

    // The coordinator dies: the page says it is stale, then catches up by
    // itself once a new coordinator serves the same database and ports.
    let mut coordinator = coordinator;
    coordinator.process.kill();
    wait_for("the page to show it is stale", BROWSER_DEADLINE, || async {
        (connection_state(&browser).await == "stale").then_some(())
    })
    .await;
    let http_listen = http_address.to_string();
    let restart_flags = [FAST_TIMING, &token_flag, &["--http-listen", &http_listen]].concat();
    let coordinator = Coordinator::restart(&db, &grpc_address, &restart_flags);
    let expected = vec![
        (
            "gpu-1".to_owned(),
            "ONLINE".to_owned(),
            "swapping a fan".to_owned(),
        ),
        ("gpu-2".to_owned(), "LEFT".to_owned(), String::new()),
    ];
    wait_for(
        "gpu-1 ONLINE again after the restart",
        START_DEADLINE,
        || async { (truth(&url).await == expected).then_some(()) },
    )
    .await;
    wait_for(
        "the page to show the truth after the restart",
        BROWSER_DEADLINE,
        || async {
            let live = connection_state(&browser).await == "live";
            (live && table(&browser).await == expected).then_some(())
        },
    )
    .await;
    assert_not_reloaded(&browser).await;

    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.len() > 1_000, "a screenshot of {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let path = screenshot_path();
    std::fs::write(&path, &png).unwrap();
    say(&format!("dashboard screenshot: {}", path.display()));
    browser.close().await.expect("close the browser");
    drop(coordinator);
}

/// Regenerates the README's screenshot, `docs/dashboard.png`: a small fleet
/// that changes for about a minute while the page watches. Run it by hand:
/// `cargo test --test dashboard_browser -- --ignored`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "regenerates docs/dashboard.png; run by hand"]
async fn readme_screenshot() {
    let what = "the README screenshot";
    if !tool_available(&["chromedriver", "--version"], INSTALL, what) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("muster.db"), "127.0.0.1:0", FAST_TIMING);
    let url = coordinator.url();
    let labels = [
        ("gpu-a100-01", "gpu=a100"),
        ("gpu-a100-02", "gpu=a100"),
        ("gpu-h100-01", "gpu=h100"),
        ("gpu-h100-02", "gpu=h100"),
        ("gpu-l40s-01", "gpu=l40s"),
        ("gpu-l40s-02", "gpu=l40s"),
    ];
    let start = |node_id: &str, label: &str| {
        start_agent_with(
            &url,
            node_id,
            &dir.path().join(node_id),
            &["--label", label, "--label", "rack=r2"],
        )
    };
    let mut agents: Vec<_> = labels.iter().map(|(id, label)| start(id, label)).collect();

    let driver = start_chromedriver().await;
    let browser = open_browser(&driver).await;
    browser.set_window_size(1100, 860).await.unwrap();
    browser
        .goto(&format!("http://{}/", coordinator.http_address()))
        .await
        .unwrap();
    for (node_id, _) in labels {
        wait_for_row(&browser, node_id, "ONLINE", BROWSER_DEADLINE).await;
    }
    let pause = || tokio::time::sleep(Duration::from_secs(8));
    pause().await;
    agents[4].kill();
    pause().await;
    agents[5].kill();
    pause().await;
    agents[4] = start(labels[4].0, labels[4].1);
    pause().await;
    let mut request = tonic::Request::new(proto::DrainNodeRequest {
        node_id: "gpu-h100-02".into(),
        reason: "replacing a fan".into(),
    });
    bearer(&mut request);
    connect(&url)
        .await
        .unwrap()
        .drain_node(request)
        .await
        .unwrap();
    pause().await;
    agents.remove(1).stop_with(Signal::SIGTERM, START_DEADLINE);
    wait_for_row(&browser, "gpu-a100-02", "LEFT", BROWSER_DEADLINE).await;
    pause().await;
    let png = browser.screenshot().await.unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &png).unwrap();
    assert!(
        png.len() < 150_000,
        "{} bytes: keep the README light",
        png.len()
    );
    say(&format!("wrote {} ({} bytes)", path.display(), png.len()));
    browser.close().await.unwrap();
}
