//! The file checkpoint store, the default outside Kubernetes.

use std::io::Write;
use std::path::{Path, PathBuf};

const PARTIAL_SUFFIX: &str = ".partial";

/// A checkpoint kept in one file, replaced atomically (write a temporary file beside it, fsync,
/// rename over, fsync the directory) so a crash mid-write leaves the previous checkpoint intact.
#[derive(Clone, Debug)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: PathBuf) -> FileStore {
        FileStore { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `None` when there is no checkpoint yet (a first start).
    pub fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.dir();
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&self.partial_prefix())
            .suffix(PARTIAL_SUFFIX)
            .tempfile_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    }

    /// Removes what writes cut short left behind: a process killed mid-write (SIGKILL, OOM,
    /// power loss) never reaches the temporary file's own clean-up, and each crash would leave
    /// up to a checkpoint's size on the volume. Returns the names removed.
    pub fn remove_partial_writes(&self) -> std::io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(self.dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let prefix = self.partial_prefix();
        let mut removed = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(PARTIAL_SUFFIX) {
                std::fs::remove_file(self.dir().join(&name))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// `.<file name>.`: a write in progress is `.<file name>.<random>.partial` beside it, so it
    /// is recognisably ours and never mistaken for another file in a shared directory.
    fn partial_prefix(&self) -> String {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        format!(".{name}.")
    }

    /// Creates the directory and a temporary file in it, then removes the file.
    pub fn check_writable(&self) -> std::io::Result<()> {
        let dir = self.dir();
        std::fs::create_dir_all(dir)?;
        tempfile::NamedTempFile::new_in(dir)?.close()
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }

    /// Moves an unreadable checkpoint aside so it is kept for inspection and the next save does
    /// not overwrite it. Returns where it went.
    pub fn set_aside(&self, now_unix_secs: u64) -> std::io::Result<String> {
        let mut aside = self.path.clone().into_os_string();
        aside.push(format!(".corrupt-{now_unix_secs}"));
        std::fs::rename(&self.path, &aside)?;
        Ok(PathBuf::from(aside).display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("sub/dir/cp"));
        assert_eq!(store.load().unwrap(), None);
        store.save(b"one").unwrap();
        store.save(b"two").unwrap();
        assert_eq!(store.load().unwrap().as_deref(), Some(&b"two"[..]));
        let aside = store.set_aside(42).unwrap();
        assert!(aside.ends_with("cp.corrupt-42"));
        assert_eq!(std::fs::read(&aside).unwrap(), b"two");
        assert_eq!(store.load().unwrap(), None);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub/dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn partial_writes_of_a_killed_process_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("cp"));
        assert_eq!(store.remove_partial_writes().unwrap(), Vec::<String>::new());
        store.save(b"whole").unwrap();
        // What a write cut short by SIGKILL leaves, and files that are not ours.
        let left = ".cp.a1B2c3.partial";
        for name in [left, ".cpx.a1B2c3.partial", ".cp.notes", "cp.corrupt-42"] {
            std::fs::write(dir.path().join(name), b"half").unwrap();
        }
        assert_eq!(store.remove_partial_writes().unwrap(), vec![left]);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".cp.notes", ".cpx.a1B2c3.partial", "cp", "cp.corrupt-42"]
        );
        assert_eq!(store.load().unwrap().as_deref(), Some(&b"whole"[..]));
    }
}
