//! The file checkpoint store, the default outside Kubernetes.

use std::io::Write;
use std::path::{Path, PathBuf};

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
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
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
}
