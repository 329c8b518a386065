//! The payload spool's writer side, as `queue/spool.py` writes it: a large sealed record
//! goes to a file in a private directory shared with the host's workers, and the stream
//! entry carries only the file's name. Released files wait in `free/` to be overwritten
//! (writing into existing pages costs several times less than allocating new ones); a writer
//! claims one by renaming it (one claimer wins), writes it as `NAME.w` and renames it to
//! `NAME` once complete, so a reader never sees half a payload.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Names of free files taken from one listing of `free/`.
const FREE_BATCH: usize = 256;
/// After a listing of `free/` found nothing, how long new files are made instead.
const RESCAN: Duration = Duration::from_millis(50);

/// A spool name: 32 lowercase hex digits (a uuid4's hex), as the Python side makes them.
pub(crate) fn is_name(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) struct Spool {
    directory: PathBuf,
    free: PathBuf,
    reusable: Mutex<(Vec<String>, Instant)>,
}

impl Spool {
    pub(crate) fn new(directory: PathBuf) -> Self {
        let free = directory.join("free");
        Self {
            directory,
            free,
            reusable: Mutex::new((Vec::new(), Instant::now())),
        }
    }

    fn next_reusable(&self) -> Option<String> {
        let mut guard = self.reusable.lock().unwrap_or_else(|p| p.into_inner());
        let (names, next_listing) = &mut *guard;
        if names.is_empty() && Instant::now() >= *next_listing {
            if let Ok(entries) = fs::read_dir(&self.free) {
                for entry in entries.flatten() {
                    if let Some(name) = entry.file_name().to_str() {
                        if is_name(name) {
                            names.push(name.to_owned());
                            if names.len() >= FREE_BATCH {
                                break;
                            }
                        }
                    }
                }
            }
            if names.is_empty() {
                *next_listing = Instant::now() + RESCAN;
            }
        }
        names.pop()
    }

    /// Write `payload` under the fresh `name` (into a recycled file when there is one).
    pub(crate) fn put(&self, name: &str, payload: &[u8]) -> io::Result<()> {
        let target = self.directory.join(name);
        while let Some(reusable) = self.next_reusable() {
            let working = self.directory.join(format!("{name}.w"));
            match fs::rename(self.free.join(&reusable), &working) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // taken meanwhile
                Err(e) => return Err(e),
            }
            let mut options = OpenOptions::new();
            options.write(true).custom_flags(libc::O_NOFOLLOW);
            write(&working, payload, &options)?;
            return fs::rename(&working, &target);
        }
        let mut options = OpenOptions::new();
        options.write(true).create_new(true).mode(0o600);
        write(&target, payload, &options)
    }

    /// A payload no longer needed (its entry was not queued): back to `free/`.
    pub(crate) fn release(&self, name: &str) {
        let path = self.directory.join(name);
        if fs::rename(&path, self.free.join(name)).is_err() {
            let _ = fs::remove_file(&path);
        }
    }
}

/// `path` holds exactly `payload` (a recycled file is cut to its length), or is gone.
fn write(path: &Path, payload: &[u8], options: &OpenOptions) -> io::Result<()> {
    let result = options.open(path).and_then(|mut file| {
        file.write_all(payload)?;
        file.set_len(payload.len() as u64)
    });
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ppml-spool-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("free")).unwrap();
        dir
    }

    #[test]
    fn writes_new_files_and_recycles_released_ones_cut_to_length() {
        let dir = temp();
        let spool = Spool::new(dir.clone());
        let first = "0123456789abcdef0123456789abcdef";
        spool.put(first, &[7u8; 1000]).unwrap();
        assert_eq!(fs::read(dir.join(first)).unwrap(), vec![7u8; 1000]);
        spool.release(first);
        assert!(dir.join("free").join(first).exists());
        let second = "fedcba9876543210fedcba9876543210";
        std::thread::sleep(RESCAN);
        spool.put(second, b"short").unwrap();
        assert_eq!(fs::read(dir.join(second)).unwrap(), b"short");
        assert!(
            !dir.join("free").join(first).exists(),
            "the free file was reused"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_are_what_the_python_side_makes() {
        assert!(is_name("0123456789abcdef0123456789abcdef"));
        assert!(!is_name("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_name("../etc/passwd"));
    }
}
