//! The work a command costs outside the hub and the broker, timed alone: the hub's
//! signature, the unit's verification and its crash-safe state dir (on tmpfs, as the
//! simulated units use it). The simulated units share the machine with the hub and
//! the broker, so these set a floor under every outpost figure that the bare NATS
//! baselines (which neither sign, verify nor write files) do not have.

use anyhow::Result;
use outpost_edge::state::StateDir;
use outpost_wire::sign::SigningKey;
use outpost_wire::{Command, Method, MsgId, Outcome, Status, now_ms};
use std::time::Instant;

pub struct Floor {
    pub sign_us: f64,
    pub verify_us: f64,
    pub state_dir_us: f64,
}

fn command(i: u64) -> Command {
    let now = now_ms();
    Command {
        id: MsgId::new(now + i),
        from: "central".into(),
        to: "floor-0".into(),
        issued_at: now,
        deadline: now + 600_000,
        domain: String::new(),
        timeout_ms: 0,
        method: Method::Ping,
        sent_at: now,
    }
}

pub fn measure(n: u32) -> Result<Floor> {
    let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()?)?;
    let public = key.public();
    let cmds: Vec<Command> = (0..n as u64).map(command).collect();

    let t = Instant::now();
    let signed: Vec<Vec<u8>> = cmds.iter().map(|c| key.sign(c)).collect();
    let sign_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = Instant::now();
    for s in &signed {
        public.verify(s)?;
    }
    let verify_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let dir =
        std::path::Path::new("/dev/shm").join(format!("outpost-floor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut st, _) = StateDir::open(&dir)?;
    let t = Instant::now();
    for c in &cmds {
        let ticket = st.accept(c, true)?;
        let outcome = Outcome {
            command: c.id,
            status: Status::Succeeded,
            exit_code: Some(0),
            stdout: vec![b'x'; 100],
            stderr: vec![],
            truncated: false,
            started_at: now_ms(),
            duration_ms: 0,
        };
        st.finish(&ticket, &outcome)?;
        st.delivered(&c.id)?;
    }
    let state_dir_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(st);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Floor {
        sign_us,
        verify_us,
        state_dir_us,
    })
}
