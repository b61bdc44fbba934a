//! Reading rule files from disk: the only I/O in `rules`.
//!
//! [`load_path`] accepts one `.toml` file or a directory. A directory contributes every `*.toml`
//! file directly inside it (not in subdirectories), in byte order of their names, so merging is
//! deterministic. Other files in the directory are ignored. A path that does not exist is an
//! error (a typo in `--rules` must not silently disable encryption); an existing directory with
//! no `.toml` file gives an empty, valid [`RuleSet`].

use std::fs;
use std::path::{Path, PathBuf};

use crate::rules::{RuleSet, RulesError};

/// Load and validate the rule file at `path`, or every `*.toml` file in the directory `path`.
pub fn load_path(path: &Path) -> Result<RuleSet, RulesError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RulesError::Io { path, source }
    };
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let files: Vec<PathBuf> = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            let file = entry.path();
            let is_toml = file.extension().is_some_and(|ext| ext == "toml");
            if is_toml && entry.file_type().map_err(io_err(&file))?.is_file() {
                files.push(file);
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };

    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        let text = fs::read_to_string(&file).map_err(io_err(&file))?;
        sources.push((file, text));
    }
    RuleSet::from_sources(&sources)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn directory_sorted_non_recursive() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("b.toml"),
            "[[table]]\nname = \"b\"\nencrypt = [\"x\"]\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("a.toml"),
            "[[table]]\nname = \"a\"\nencrypt = [\"x\"]\n",
        )
        .unwrap();
        fs::write(dir.path().join("notes.txt"), "not toml").unwrap();
        fs::create_dir(dir.path().join("sub.toml")).unwrap();
        fs::create_dir(dir.path().join("nested")).unwrap();
        fs::write(dir.path().join("nested/c.toml"), "garbage = [").unwrap();

        let rules = load_path(dir.path()).unwrap();
        let names: Vec<_> = rules.tables().map(|t| t.name()).collect();
        assert_eq!(names, ["a", "b"]);

        let single = load_path(&dir.path().join("b.toml")).unwrap();
        assert_eq!(single.tables().count(), 1);
    }

    #[test]
    fn empty_dir_is_empty_rules_and_missing_is_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_path(dir.path()).unwrap().is_empty());
        let missing = dir.path().join("nope");
        let err = load_path(&missing).unwrap_err();
        assert!(matches!(err, RulesError::Io { .. }));
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn duplicate_across_files_names_both() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("1.toml"),
            "[[table]]\nname = \"t\"\nencrypt = [\"x\"]\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("2.toml"),
            "\n[[table]]\nname = \"public.T\"\nencrypt = [\"y\"]\n",
        )
        .unwrap();
        let err = load_path(dir.path()).unwrap_err().to_string();
        assert!(err.contains("2.toml:3"), "{err}");
        assert!(err.contains("1.toml:2"), "{err}");
        assert!(err.contains("public.t"), "{err}");
    }

    #[test]
    fn repo_example_rules_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        let rules = load_path(&root).unwrap();
        let t = rules.table("public", "vault_secrets").unwrap();
        assert_eq!(t.tenant_column(), Some("org_id"));
        assert!(rules.column("public", "vault_secrets", "value").is_some());
    }
}
