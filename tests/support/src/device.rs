//! The "device adapter" (thin-edge's idea): one interface over the ways a unit can
//! exist in a test, so the same scenario runs against a local process, an ARM agent
//! under qemu-user, or a whole ARM64 Linux unit under qemu-system (docs/qemu.md).
//!
//! Every device connects to the fleet's broker and can be started, killed hard, cut
//! off the network and reconnected, and asked to run a shell command "on its
//! console" (for a process that is the host's shell; for the VM its serial console).

use crate::proxy::{Mode, Proxy};
use crate::{AgentOpts, Fleet, Proc, now_ms, which};
use anyhow::{Context, Result, bail, ensure};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A unit under test.
#[allow(async_fn_in_trait)] // used with generics only, never as `dyn`
pub trait Device {
    /// The node name it is enrolled as.
    fn node(&self) -> &str;
    /// Start (or boot) it; it comes online on its own, without waiting here.
    async fn start(&mut self, f: &mut Fleet) -> Result<()>;
    /// Stop it hard: SIGKILL for a process, power off for a VM.
    fn kill(&mut self) -> Result<()>;
    /// Cut its network link: nothing passes either way until [`Device::restore_link`].
    async fn cut_link(&mut self) -> Result<()>;
    async fn restore_link(&mut self) -> Result<()>;
    /// Run `cmd` with `sh` on the device; its stdout and stderr, and its exit status.
    async fn console(&mut self, cmd: &str, limit: Duration) -> Result<(String, i32)>;
    /// A file path on the device that survives a restart of the agent (and of the
    /// device, where it has a disk).
    fn persistent_path(&self, name: &str) -> String;
}

/// The agent as a process on this host: natively, or an ARM build under qemu-user
/// (`opts.wrapper`). Its link goes through a [`Proxy`] that the test can cut.
pub struct ProcessDevice {
    node: String,
    opts: AgentOpts,
    proxy: Option<Proxy>,
    proc: Option<Proc>,
    work: PathBuf,
}

impl ProcessDevice {
    pub fn local(node: &str) -> ProcessDevice {
        ProcessDevice::with_opts(node, AgentOpts::default())
    }

    /// An ARM agent under qemu-user: `wrapper` is e.g. `[qemu-aarch64-static, -cpu,
    /// cortex-a53, <binary>]`.
    pub fn qemu_user(node: &str, wrapper: Vec<String>) -> ProcessDevice {
        ProcessDevice::with_opts(
            node,
            AgentOpts {
                wrapper: Some(wrapper),
                ..Default::default()
            },
        )
    }

    pub fn with_opts(node: &str, opts: AgentOpts) -> ProcessDevice {
        ProcessDevice {
            node: node.into(),
            opts,
            proxy: None,
            proc: None,
            work: PathBuf::new(),
        }
    }
}

impl Device for ProcessDevice {
    fn node(&self) -> &str {
        &self.node
    }

    async fn start(&mut self, f: &mut Fleet) -> Result<()> {
        if self.proxy.is_none() {
            self.proxy = Some(Proxy::start(f.port).await?);
        }
        let mut opts = self.opts.clone();
        opts.nats_url = self.proxy.as_ref().map(|p| p.url());
        self.work = f.work_dir(&self.node);
        let cmd = f.agent_command(&self.node, &opts)?;
        let log = f
            .dir
            .path()
            .join(format!("agent-{}-device-{}.log", self.node, now_ms()));
        self.proc = Some(Proc::spawn(&self.node, cmd, log)?);
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        Ok(())
    }

    async fn cut_link(&mut self) -> Result<()> {
        self.proxy.as_ref().context("not started")?.set(Mode::Down);
        Ok(())
    }

    async fn restore_link(&mut self) -> Result<()> {
        self.proxy.as_ref().context("not started")?.set(Mode::Pass);
        Ok(())
    }

    async fn console(&mut self, cmd: &str, limit: Duration) -> Result<(String, i32)> {
        let child = tokio::process::Command::new("sh")
            .args(["-c", cmd])
            .kill_on_drop(true)
            .output();
        let o = tokio::time::timeout(limit, child)
            .await
            .with_context(|| format!("`{cmd}` took longer than {limit:?}"))??;
        let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&o.stderr));
        Ok((text, o.status.code().unwrap_or(-1)))
    }

    fn persistent_path(&self, name: &str) -> String {
        self.work.join(name).display().to_string()
    }
}

/// The address the VM reaches the broker at: QEMU's user network forwards it (and
/// only it, with `restrict=on`) to the broker on the host's loopback. The fleet's
/// server certificate must name it: [`Fleet::start_with_hosts`].
pub const VM_BROKER_ADDR: &str = "10.0.2.100";

/// The built guest, from `cargo xtask qemu-image`.
#[derive(Clone, Debug)]
pub struct VmImage {
    pub dir: PathBuf,
    /// The guest kernel's release (`uname -r`), what the hub must list.
    pub kernel_release: String,
}

impl VmImage {
    /// The image in `$OUTPOST_QEMU_IMAGE_DIR`, by default `<target dir>/qemu/aarch64`,
    /// or why it cannot be used.
    pub fn find() -> std::result::Result<VmImage, String> {
        let dir = match std::env::var_os("OUTPOST_QEMU_IMAGE_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                // <target dir>/<profile>/deps/<test>
                exe.ancestors()
                    .nth(3)
                    .ok_or("no target dir above the test binary")?
                    .join("qemu")
                    .join("aarch64")
            }
        };
        for f in ["vmlinuz", "base.cpio.gz", "kernel-release"] {
            if !dir.join(f).is_file() {
                return Err(format!(
                    "{} is missing: build the guest with `cargo xtask qemu-image` (CI does it before the tests), or set OUTPOST_QEMU_IMAGE_DIR",
                    dir.join(f).display()
                ));
            }
        }
        for tool in ["qemu-system-aarch64", "socat", "mkfs.ext4"] {
            if which(tool).is_none() {
                return Err(format!(
                    "{tool} is not on PATH: `cargo xtask qemu-image` installs it (as root or with CI set)"
                ));
            }
        }
        let kernel_release = std::fs::read_to_string(dir.join("kernel-release"))
            .map_err(|e| e.to_string())?
            .trim()
            .to_string();
        Ok(VmImage {
            dir,
            kernel_release,
        })
    }
}

/// A whole ARM64 Linux unit under qemu-system-aarch64 (`-M virt -cpu cortex-a53`, TCG):
/// Debian's kernel, a busybox init that supervises the agent, a persistent ext4 disk
/// for its state, the fleet's config in a second cpio appended at boot. Controlled
/// through the QEMU monitor (link, reset) and the serial console (commands).
pub struct QemuVm {
    node: String,
    image: VmImage,
    run: PathBuf,
    qemu: Option<Proc>,
    console: Option<Console>,
    seq: u32,
}

struct Console {
    out: UnixStream,
    buf: Arc<Mutex<Vec<u8>>>,
}

impl QemuVm {
    pub fn new(node: &str, image: VmImage) -> QemuVm {
        QemuVm {
            node: node.into(),
            image,
            run: PathBuf::new(),
            qemu: None,
            console: None,
            seq: 0,
        }
    }

    /// Its console log, disk, initrd and sockets.
    pub fn run_dir(&self) -> &Path {
        &self.run
    }

    /// Everything the serial console printed so far (kernel, init, console commands).
    pub fn console_log(&self) -> String {
        std::fs::read_to_string(self.run.join("console.log")).unwrap_or_default()
    }

    /// One QEMU monitor command (`set_link n0 off`, `system_reset`); its reply.
    pub fn monitor(&self, cmd: &str) -> Result<String> {
        let mut s = UnixStream::connect(self.run.join("monitor.sock"))
            .context("connecting to the QEMU monitor")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        read_until(&mut s, b"(qemu) ")?;
        s.write_all(format!("{cmd}\n").as_bytes())?;
        let reply = read_until(&mut s, b"(qemu) ")?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// Hard reset, as the reset button does: no shutdown, no sync.
    pub fn reset(&self) -> Result<()> {
        self.monitor("system_reset").map(|_| ())
    }

    /// How many times the guest's init has reached its console shell.
    pub fn boots(&self) -> usize {
        self.console
            .as_ref()
            .map(|c| {
                let b = c.buf.lock().expect("console buffer");
                String::from_utf8_lossy(&b)
                    .matches("OUTPOST-VM-READY")
                    .count()
            })
            .unwrap_or(0)
    }

    fn write_config(&self, f: &Fleet) -> Result<Vec<u8>> {
        let bundle = f.bundle(&self.node);
        let from_bundle = std::fs::read_to_string(bundle.join("edge.toml"))?;
        let mut toml = String::new();
        toml.push_str(&format!("node = \"{}\"\n", self.node));
        toml.push_str(&format!(
            "nats_url = \"tls://{VM_BROKER_ADDR}:{}\"\n",
            f.port
        ));
        toml.push_str("ca_file = \"/config/ca.pem\"\nnkey_file = \"/config/node.nk\"\n");
        toml.push_str(&format!("hub_key = \"{}\"\n", f.hub_key()));
        toml.push_str("state_dir = \"/data/state\"\n");
        for l in from_bundle
            .lines()
            .filter(|l| l.starts_with("prefix") || l.starts_with("labels"))
        {
            toml.push_str(l);
            toml.push('\n');
        }
        toml.push_str(crate::ALLOW_ALL);
        let env = "AGENT_ARGS=\"--hello-interval 1\"\nexport RUST_LOG=info,outpost_edge=debug,async_nats=warn\n";
        let mut c = Cpio::default();
        c.dir("config");
        c.file("config/edge.toml", toml.as_bytes(), 0o600);
        c.file(
            "config/ca.pem",
            &std::fs::read(bundle.join("ca.pem"))?,
            0o644,
        );
        c.file(
            "config/node.nk",
            &std::fs::read(bundle.join("node.nk"))?,
            0o600,
        );
        c.file("config/env", env.as_bytes(), 0o644);
        c.file("config/node", self.node.as_bytes(), 0o644);
        Ok(c.finish())
    }
}

impl Device for QemuVm {
    fn node(&self) -> &str {
        &self.node
    }

    async fn start(&mut self, f: &mut Fleet) -> Result<()> {
        ensure!(self.qemu.is_none(), "the VM is already running");
        f.enroll(&self.node)?;
        self.run = f.dir.path().join(format!("vm-{}", self.node));
        std::fs::create_dir_all(&self.run)?;
        // The initramfs: the base (gzip), zero-padded to 4 bytes, then the config cpio.
        let mut initrd = std::fs::read(self.image.dir.join("base.cpio.gz"))?;
        while !initrd.len().is_multiple_of(4) {
            initrd.push(0);
        }
        initrd.extend(self.write_config(f)?);
        std::fs::write(self.run.join("initrd"), initrd)?;
        let disk = self.run.join("data.ext4");
        if !disk.exists() {
            std::fs::File::create(&disk)?.set_len(64 << 20)?;
            let o = Command::new(which("mkfs.ext4").context("mkfs.ext4")?)
                .args(["-q", "-F", "-L", "outpost-data"])
                .arg(&disk)
                .output()?;
            ensure!(
                o.status.success(),
                "mkfs.ext4: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let mut cmd = Command::new("qemu-system-aarch64");
        let p = |n: &str| self.run.join(n).display().to_string();
        cmd.args(["-M", "virt", "-cpu", "cortex-a53", "-smp", "1", "-m", "256"])
            .args(["-display", "none", "-nodefaults"])
            .arg("-kernel")
            .arg(self.image.dir.join("vmlinuz"))
            .args(["-initrd", &p("initrd")])
            .args([
                "-append",
                "console=ttyAMA0 rdinit=/init loglevel=3 panic=-1",
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,id=con,path={},server=on,wait=off,logfile={}",
                p("console.sock"),
                p("console.log")
            ))
            .args(["-serial", "chardev:con"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", p("monitor.sock")))
            // restrict=on: the guest reaches nothing but this forward to the broker.
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,guestfwd=tcp:{VM_BROKER_ADDR}:{port}-cmd:socat STDIO TCP:127.0.0.1:{port}",
                port = f.port
            ))
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .arg("-drive")
            .arg(format!(
                "file={},if=none,format=raw,id=d0",
                disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"]);
        self.qemu = Some(Proc::spawn(
            "qemu-system-aarch64",
            cmd,
            self.run.join("qemu.log"),
        )?);
        // Attach to the console as soon as QEMU listens.
        let sock = self.run.join("console.sock");
        let end = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if Instant::now() > end {
                bail!(
                    "QEMU did not open its console socket: {}",
                    std::fs::read_to_string(self.run.join("qemu.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (mut r, b) = (stream.try_clone()?, buf.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock()
                    .expect("console buffer")
                    .extend_from_slice(&chunk[..n]);
            }
        });
        self.console = Some(Console { out: stream, buf });
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        self.console = None;
        if let Some(mut q) = self.qemu.take() {
            q.kill();
        }
        Ok(())
    }

    async fn cut_link(&mut self) -> Result<()> {
        self.monitor("set_link n0 off").map(|_| ())
    }

    async fn restore_link(&mut self) -> Result<()> {
        self.monitor("set_link n0 on").map(|_| ())
    }

    /// Typed into the serial console's shell; the end is found by a marker the
    /// shell prints (spelled so that an echo of the input cannot match it).
    async fn console(&mut self, cmd: &str, limit: Duration) -> Result<(String, i32)> {
        self.seq += 1;
        let n = self.seq;
        let c = self.console.as_mut().context("the VM is not running")?;
        let start = c.buf.lock().expect("console buffer").len();
        // One line, so no prompt lands inside the output.
        let line = format!("echo '<<B''{n}>>'; {cmd}; echo \"<<E\"\"{n}>> $?\"\n");
        c.out.write_all(line.as_bytes())?;
        let (begin, end) = (format!("<<B{n}>>"), format!("<<E{n}>> "));
        let end_at = Instant::now() + limit;
        loop {
            {
                let b = c.buf.lock().expect("console buffer");
                let text = String::from_utf8_lossy(&b[start.min(b.len())..]).into_owned();
                if let (Some(i), Some(j)) = (text.find(&begin), text.find(&end)) {
                    let out = text[i + begin.len()..j]
                        .trim_start_matches(['\r', '\n'])
                        .replace("\r\n", "\n");
                    let rest = &text[j + end.len()..];
                    let code = rest
                        .lines()
                        .next()
                        .and_then(|l| l.trim().parse().ok())
                        .unwrap_or(-1);
                    if rest.contains('\n') {
                        return Ok((out, code));
                    }
                }
            }
            if Instant::now() > end_at {
                bail!("console command `{cmd}` did not finish within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn persistent_path(&self, name: &str) -> String {
        format!("/data/{name}")
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Byte by byte, so nothing after the pattern is consumed.
fn read_until(s: &mut UnixStream, pat: &[u8]) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    while !got.ends_with(pat) {
        let mut byte = [0u8; 1];
        if s.read(&mut byte)? == 0 {
            bail!("the monitor closed: {}", String::from_utf8_lossy(&got));
        }
        got.push(byte[0]);
    }
    Ok(got)
}

/// A newc ("070701") cpio archive, as the kernel unpacks into its initramfs.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }
    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) {
        self.entry(name, 0o100000 | mode, data);
    }
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for v in fields {
            self.out.extend_from_slice(format!("{v:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}
