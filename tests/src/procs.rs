//! The processes a test starts, and the temp dirs of its servers: both
//! go with the test, also when it is killed outright (nextest's timeout
//! sends SIGKILL, and no `Drop` runs).

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Names the temp dirs of the kit's servers; each holds its test process's
/// pid in [`OWNER`].
const SERVER_DIR_PREFIX: &str = "coordkit-nats-";
const OWNER: &str = "owner.pid";

/// A fresh temp dir for a server's store, config and log, made after
/// removing those left by test processes that were killed (their `Drop`
/// never ran; a store can be gigabytes).
pub(crate) fn server_dir() -> tempfile::TempDir {
    remove_dead_server_dirs();
    let dir = tempfile::Builder::new()
        .prefix(SERVER_DIR_PREFIX)
        .tempdir()
        .expect("temp dir for nats-server");
    std::fs::write(dir.path().join(OWNER), std::process::id().to_string()).expect("owner file");
    dir
}

/// Removes the kit's server dirs whose owning process no longer exists. A
/// dir without an owner file, or whose pid is taken again, is left alone.
fn remove_dead_server_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(SERVER_DIR_PREFIX)
        {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join(OWNER))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        if let Some(pid) = owner {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Starts `cmd` so that the child is killed when this process ends, however
/// it ends. The child asks the kernel for SIGKILL on its parent's death
/// (`PR_SET_PDEATHSIG`); the kernel's "parent" is the thread that started it,
/// so every child is started from one thread that lives as long as the
/// process (a test's own threads, or a runtime's, may end before it).
pub fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    use std::sync::{mpsc, Mutex, OnceLock};
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(tie_to_parent(&mut cmd).spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Has the child of `cmd` killed when the thread that starts it ends (see
/// [`spawn_tied`]); usable on a `tokio::process::Command` through its
/// `as_std_mut`, started from a thread that lasts as long as the test.
pub fn tie_to_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls (prctl,
    // getppid) are made, on values copied before the fork.
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the request was made.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the test process is gone"));
            }
            Ok(())
        })
    }
}

/// A child process a test can freeze and thaw with signals (`SIGSTOP` /
/// `SIGCONT`): unlike [`Isolated`], it keeps its sockets open while frozen and
/// wakes with every timer expired. Killed (after a `SIGCONT`) on drop.
pub struct Process {
    child: Child,
}

impl Process {
    /// Starts `bin` with `args`; its output goes to the test's stderr.
    pub fn spawn<I, S>(bin: &Path, args: I) -> Process
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Process::command(cmd)
    }

    /// Starts `cmd` as it is set up (arguments, environment); its output goes
    /// to the test's stderr.
    pub fn command(mut cmd: Command) -> Process {
        cmd.stdin(Stdio::null());
        let program = cmd.get_program().to_owned();
        let child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot start {program:?}: {e}"));
        Process { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes it (`kill -STOP`).
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (`kill -CONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Whether it is still running (or frozen), not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {} failed", self.pid());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.pid().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
