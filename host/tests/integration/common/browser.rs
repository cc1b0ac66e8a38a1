//! A real headless Chromium for the Gangway tests, driven over WebDriver by chromedriver on a free
//! loopback port. Each `Browser` owns its chromedriver (in a process group of its own, so that
//! Chromium and its helpers go with it) and a fresh profile directory; dropping it kills both.
//!
//! Hand-written over `reqwest` rather than a WebDriver crate such as fantoccini: the tests need a
//! handful of commands (open, run a script, screenshot, window size, one DevTools call), and this
//! keeps a second HTTP and TLS stack out of the dev-dependencies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

/// The programs a browser test needs.
pub struct Tools {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Chromium and chromedriver, or `None` (with the reason printed) when they are missing. Under
/// `CI=true` a missing browser fails the test instead: CI must not pass by skipping.
pub fn tools() -> Option<Tools> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| on_path(&["chromium", "chromium-browser", "google-chrome"]));
    let chromedriver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| on_path(&["chromedriver"]));
    match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => Some(Tools {
            chromium,
            chromedriver,
        }),
        _ => {
            let why =
                "chromium and chromedriver are needed (apt-get install chromium chromium-driver)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{why}; CI=true, so this test fails instead of skipping"
            );
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// Where tests leave screenshots for people to look at.
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("gangway-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: reqwest::Client,
    _profile: TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Browser {
    pub async fn launch(tools: &Tools) -> Browser {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let driver = Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = browser
                .client
                .get(format!("{}/status", browser.base))
                .send()
                .await;
            if let Ok(resp) = ready
                && let Ok(v) = resp.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not come up within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": tools.chromium,
                "args": args,
            },
        }}});
        let created = browser.post_raw("/session", caps).await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        browser
    }

    async fn post_raw(&self, path: &str, body: Value) -> Value {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let status = resp.status();
        let v: Value = resp.json().await.expect("WebDriver answers JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }

    async fn cmd(&self, path: &str, body: Value) -> Value {
        self.post_raw(&format!("/session/{}{path}", self.session), body)
            .await
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("/url", json!({ "url": url })).await;
    }

    /// The value of a JavaScript expression in the page.
    pub async fn value(&self, expression: &str) -> Value {
        self.eval(&format!("return {expression}"), Value::Array(Vec::new()))
            .await
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its
    /// result.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.cmd("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Evaluates `script` until it returns something other than `null`/`false`, for at most
    /// `within`; returns that value and how long it took.
    pub async fn wait_for(&self, within: Duration, what: &str, script: &str) -> (Value, Duration) {
        let start = Instant::now();
        loop {
            let v = self.eval(script, json!([])).await;
            if !v.is_null() && v != false {
                return (v, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "timed out after {within:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends real key presses to the element `css` selects.
    pub async fn type_into(&self, css: &str, text: &str) {
        let found = self
            .cmd("/element", json!({ "using": "css selector", "value": css }))
            .await;
        let id = found["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .expect("element id")
            .to_owned();
        self.cmd(&format!("/element/{id}/value"), json!({ "text": text }))
            .await;
    }

    /// Presses and releases one key on whatever has the focus (WebDriver key values, e.g.
    /// `"\u{E00C}"` for Escape).
    pub async fn press(&self, key: &str) {
        self.cmd(
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
                {"type": "keyDown", "value": key},
                {"type": "keyUp", "value": key},
            ]}]}),
        )
        .await;
    }

    pub async fn set_window(&self, width: u32, height: u32) {
        self.cmd("/window/rect", json!({ "width": width, "height": height }))
            .await;
    }

    /// Makes the page see `prefers-color-scheme: dark` (or light).
    pub async fn color_scheme(&self, scheme: &str) {
        self.cmd(
            "/goog/cdp/execute",
            json!({
                "cmd": "Emulation.setEmulatedMedia",
                "params": { "features": [{ "name": "prefers-color-scheme", "value": scheme }] },
            }),
        )
        .await;
    }

    /// Saves a PNG of the viewport under `target/gangway-artifacts/`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let resp = self
            .client
            .get(format!("{}/session/{}/screenshot", self.base, self.session))
            .send()
            .await
            .expect("screenshot");
        let v: Value = resp.json().await.expect("screenshot JSON");
        let png = base64_decode(v["value"].as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = artifacts_dir().join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Ends the session politely (Chromium exits), then the driver.
    pub async fn close(self) {
        let _ = self
            .client
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver, Chromium and every helper process Chromium started.
        let group = self.driver.id() as libc::pid_t;
        // SAFETY: a plain syscall on the process group this test started.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter_map(value) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
