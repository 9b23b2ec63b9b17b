//! Writing output files: atomic writes, and the names of a batch's files.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::params::{OutputFormat, DEFAULT_OUTPUT_FORMAT};

/// Prefix of the temporary files [`write_atomic`] creates beside the target.
pub const TEMP_FILE_PREFIX: &str = ".easel-";

/// Errors of choosing output file names and formats.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputPathError {
    /// The file's extension names no supported format.
    #[error("{path}: unknown image extension `.{extension}` (use .png, .jpg, .jpeg or .webp)", path = .path.display())]
    UnknownExtension {
        /// The output file.
        path: PathBuf,
        /// Its extension, without the dot.
        extension: String,
    },
    /// The file's extension says one format and the format asked for is another.
    #[error("{path}: the extension says {extension_format} but the output format is {format}; rename the file to .{ext} or ask for {extension_format}", path = .path.display(), ext = .format.extension())]
    FormatMismatch {
        /// The output file.
        path: PathBuf,
        /// The format of its extension.
        extension_format: OutputFormat,
        /// The format asked for.
        format: OutputFormat,
    },
    /// The output path names no file (empty, `/`, `..` or ending in a separator).
    #[error("{path}: not a file name; give a file such as out.png, or an output directory", path = .path.display())]
    NotAFile {
        /// The output path.
        path: PathBuf,
    },
}

/// Where a command writes its images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// One file (`--output FILE`); a batch gets numbered siblings.
    File(PathBuf),
    /// A directory (`--output-dir DIR`) to put generated names in.
    Dir(PathBuf),
}

/// Write `bytes` to `path` atomically: into a temporary file in the same
/// directory (named `.easel-XXXXXX.tmp`), flushed to disk (fsync), then
/// renamed over `path`. `path` thus holds either its old content or all of
/// `bytes`, never part of them. On error the temporary file is removed; only
/// a kill between creating and renaming it (e.g. a second Ctrl-C with no
/// handler) can leave one behind, never a partial `path`.
///
/// The new file gets the usual permissions (0666 less the umask), not the
/// 0600 of temporary files.
///
/// # Errors
/// An [`io::Error`] of the underlying kind whose message names `path`: the
/// directory does not exist (`NotFound`), is not writable
/// (`PermissionDenied`), `path` names no file (`InvalidInput`), the disk is
/// full, or the rename fails (e.g. `path` is a directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let shown = path.display();
    if path.file_name().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot write {shown}: not a file name"),
        ));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let context = |e: io::Error| io::Error::new(e.kind(), format!("cannot write {shown}: {e}"));

    let mut builder = tempfile::Builder::new();
    builder.prefix(TEMP_FILE_PREFIX).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Passed to open(2), so the umask applies as for any new file.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut temp = builder.tempfile_in(dir).map_err(|e| {
        let dir = dir.display();
        let why = match e.kind() {
            io::ErrorKind::NotFound => {
                format!("the directory {dir} does not exist (create it first)")
            }
            io::ErrorKind::PermissionDenied => format!(
                "the directory {dir} is not writable (check its permissions or write elsewhere)"
            ),
            _ => format!("cannot create a file in {dir}: {e}"),
        };
        io::Error::new(e.kind(), format!("cannot write {shown}: {why}"))
    })?;
    temp.write_all(bytes).map_err(context)?;
    temp.as_file().sync_all().map_err(context)?;
    // On failure the PersistError drops the temporary file, removing it.
    temp.persist(path).map_err(|e| context(e.error))?;
    // Make the rename itself durable; not all platforms can sync a directory.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The output format, from an explicit choice and/or the output file's
/// extension (`.png`, `.jpg`/`.jpeg`, `.webp`, any case).
///
/// - Both given: they must agree.
/// - Only one given: that one.
/// - Neither (no path, or a path without extension): [`DEFAULT_OUTPUT_FORMAT`] (webp).
///
/// # Errors
/// [`OutputPathError::UnknownExtension`] for any other extension,
/// [`OutputPathError::FormatMismatch`] when the extension and `explicit` disagree.
pub fn resolve_output_format(
    explicit: Option<OutputFormat>,
    path: Option<&Path>,
) -> Result<OutputFormat, OutputPathError> {
    let from_extension = match path {
        Some(path) => extension_format(path)?,
        None => None,
    };
    match (explicit, from_extension) {
        (Some(format), Some(extension_format)) if format != extension_format => {
            Err(OutputPathError::FormatMismatch {
                path: path.map(Path::to_path_buf).unwrap_or_default(),
                extension_format,
                format,
            })
        }
        (Some(format), _) | (None, Some(format)) => Ok(format),
        (None, None) => Ok(DEFAULT_OUTPUT_FORMAT),
    }
}

/// The format named by `path`'s extension; `None` when it has none.
fn extension_format(path: &Path) -> Result<Option<OutputFormat>, OutputPathError> {
    let Some(extension) = path.extension() else {
        return Ok(None);
    };
    let extension = extension.to_string_lossy();
    match OutputFormat::from_extension(&extension) {
        Some(format) => Ok(Some(format)),
        None => Err(OutputPathError::UnknownExtension {
            path: path.to_path_buf(),
            extension: extension.into_owned(),
        }),
    }
}

/// The files to write `count` images of `format` to, in batch order.
///
/// - [`OutputTarget::File`] `out.png`: `out.png` for one image; `out-0.png`,
///   `out-1.png`, ... for more (beside `out.png`, keeping its extension's
///   spelling, e.g. `.jpeg`). A file without extension gets the format's
///   (`out` becomes `out.webp`).
/// - [`OutputTarget::Dir`] `dir`: `dir/easel-<seed>-<i>.<ext>` for image `i`
///   (0-based, also for a single image), where `seed` is the seed of image 0
///   (image `i` was generated with `seed + i`) and `ext` is
///   [`OutputFormat::extension`]. Rerunning with the same seed overwrites.
///
/// # Errors
/// For a file: [`OutputPathError::NotAFile`] when it names no file, and the
/// errors of [`resolve_output_format`] when its extension is unknown or
/// names another format.
pub fn output_paths(
    target: &OutputTarget,
    count: usize,
    format: OutputFormat,
    seed: u64,
) -> Result<Vec<PathBuf>, OutputPathError> {
    match target {
        OutputTarget::Dir(dir) => Ok((0..count)
            .map(|i| dir.join(format!("easel-{seed}-{i}.{}", format.extension())))
            .collect()),
        OutputTarget::File(file) => {
            let not_a_file = || OutputPathError::NotAFile { path: file.clone() };
            let stem = file.file_stem().ok_or_else(not_a_file)?;
            if file.file_name().is_none() || file.as_os_str().to_string_lossy().ends_with('/') {
                return Err(not_a_file());
            }
            resolve_output_format(Some(format), Some(file))?;
            let extension = match file.extension() {
                Some(extension) => extension.to_os_string(),
                None => format.extension().into(),
            };
            if count == 1 {
                return Ok(vec![file.with_extension(&extension)]);
            }
            Ok((0..count)
                .map(|i| {
                    let mut name = stem.to_os_string();
                    name.push(format!("-{i}."));
                    name.push(&extension);
                    file.with_file_name(name)
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(entries(dir.path()), ["out.png"]);
    }

    #[cfg(unix)]
    #[test]
    fn write_atomic_gives_normal_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let plain = dir.path().join("plain");
        write_atomic(&ours, b"x").unwrap();
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ours), mode(&plain));
    }

    #[test]
    fn write_atomic_into_a_missing_directory_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("out.png");
        let err = write_atomic(&path, b"data").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("does not exist"), "{message}");
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn write_atomic_failures_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a directory: the rename fails after the data is written.
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"x").unwrap();
        let err = write_atomic(&target, b"data").unwrap_err();
        assert!(err.to_string().contains("taken"), "{err}");
        assert_eq!(entries(dir.path()), ["taken"]);

        let err = write_atomic(Path::new("/"), b"data").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[cfg(unix)]
    #[test]
    fn write_atomic_into_a_read_only_directory_says_so() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        let result = write_atomic(&locked.join("out.png"), b"data");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Root may write anyway; otherwise the error names the path.
        if let Err(err) = result {
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
            assert!(err.to_string().contains("not writable"), "{err}");
            assert!(err.to_string().contains("out.png"), "{err}");
        }
    }

    #[test]
    fn output_format_from_extension_and_choice() {
        use OutputFormat::*;
        let p = |s: &'static str| Some(Path::new(s));
        assert_eq!(resolve_output_format(None, None), Ok(Webp));
        assert_eq!(resolve_output_format(Some(Png), None), Ok(Png));
        assert_eq!(resolve_output_format(None, p("a/out.JPG")), Ok(Jpeg));
        assert_eq!(resolve_output_format(None, p("out.jpeg")), Ok(Jpeg));
        assert_eq!(resolve_output_format(None, p("out")), Ok(Webp));
        assert_eq!(resolve_output_format(Some(Png), p("out")), Ok(Png));
        assert_eq!(resolve_output_format(Some(Webp), p("out.webp")), Ok(Webp));
        assert_eq!(
            resolve_output_format(Some(Jpeg), p("out.png"))
                .unwrap_err()
                .to_string(),
            "out.png: the extension says png but the output format is jpeg; \
             rename the file to .jpg or ask for png"
        );
        assert_eq!(
            resolve_output_format(None, p("out.gif"))
                .unwrap_err()
                .to_string(),
            "out.gif: unknown image extension `.gif` (use .png, .jpg, .jpeg or .webp)"
        );
    }

    #[test]
    fn output_paths_for_files_and_directories() {
        let file = |s: &str| OutputTarget::File(PathBuf::from(s));
        let paths = |target, n, format| output_paths(&target, n, format, 42).unwrap();
        assert_eq!(
            paths(file("out/cat.png"), 1, OutputFormat::Png),
            [PathBuf::from("out/cat.png")]
        );
        assert_eq!(
            paths(file("cat.jpeg"), 3, OutputFormat::Jpeg),
            ["cat-0.jpeg", "cat-1.jpeg", "cat-2.jpeg"].map(PathBuf::from)
        );
        assert_eq!(
            paths(file("cat"), 1, OutputFormat::Webp),
            [PathBuf::from("cat.webp")]
        );
        assert_eq!(
            paths(file("a.b/cat"), 2, OutputFormat::Png),
            ["a.b/cat-0.png", "a.b/cat-1.png"].map(PathBuf::from)
        );
        assert_eq!(
            paths(OutputTarget::Dir("imgs".into()), 2, OutputFormat::Jpeg),
            ["imgs/easel-42-0.jpg", "imgs/easel-42-1.jpg"].map(PathBuf::from)
        );
        assert!(matches!(
            output_paths(&file("cat.png"), 2, OutputFormat::Webp, 0),
            Err(OutputPathError::FormatMismatch { .. })
        ));
        for bad in ["", "/", "out/", ".."] {
            assert!(
                matches!(
                    output_paths(&file(bad), 1, OutputFormat::Png, 0),
                    Err(OutputPathError::NotAFile { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
