//! The `filesystem` pollster: `statvfs(2)` of the multiproc directory's filesystem, as
//! node_exporter's `node_filesystem_*{device,fstype,mountpoint}` gauges (labels in its order).
//!
//! This is the filesystem that fills up under the workers (their files, the archive), so it is
//! the one watched, not every mount of the host. The mount is found in `/proc/self/mountinfo`
//! (procfs's `MountInfo`, one line at a time so that one odd line loses only itself): the one
//! whose mount point is the longest prefix of the directory's canonical path, among those with
//! the directory's `st_dev` when any has it (a bind mount of another filesystem over a prefix
//! would otherwise win), the last listed when mounts are stacked on one point (the one on top).
//! Mount points and devices are unescaped (`\040` is a space), as node_exporter does.
//!
//! Sizes are blocks × the fragment size (`f_frsize`, the unit `statvfs` counts blocks in;
//! node_exporter multiplies by `f_bsize`, which is the same number on every common Linux
//! filesystem). `node_filesystem_readonly` is 1 for a read-only mount or superblock. When
//! `statvfs` fails, only `node_filesystem_device_error 1` is given, as node_exporter does.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use procfs::process::MountInfo;

use super::families::{finish, lines, read_proc, Fam};
use crate::merge::SnapFamily;

/// The labels of every family.
const LABELS: &[&str] = &["device", "fstype", "mountpoint"];

/// The mount a directory is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mount {
    /// The mount source (`/dev/vda`, `tmpfs`), `none` if there is none.
    pub device: String,
    /// Where it is mounted.
    pub mountpoint: String,
    /// The filesystem type (`ext4`, `tmpfs`).
    pub fstype: String,
    /// Mounted read-only (`ro` in the mount's or the superblock's options).
    pub ro: bool,
}

/// What `statvfs` says of a filesystem, in bytes and inodes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Figures {
    /// Total size.
    pub size: f64,
    /// Free space.
    pub free: f64,
    /// Free space for users other than root.
    pub avail: f64,
    /// Inodes.
    pub files: f64,
    /// Free inodes.
    pub files_free: f64,
    /// `ST_RDONLY`.
    pub readonly: bool,
}

impl Figures {
    fn of(s: &nix::sys::statvfs::Statvfs) -> Figures {
        let unit = (if s.fragment_size() > 0 { s.fragment_size() } else { s.block_size() }) as f64;
        Figures {
            size: s.blocks() as f64 * unit,
            free: s.blocks_free() as f64 * unit,
            avail: s.blocks_available() as f64 * unit,
            files: s.files() as f64,
            files_free: s.files_free() as f64,
            readonly: s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        }
    }
}

/// Reads the families of `dir`'s filesystem now.
pub fn read(dir: &Path) -> Result<Vec<SnapFamily>, String> {
    let path = std::fs::canonicalize(dir).map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    // One descriptor for both st_dev and statvfs: the same directory, even if renamed meanwhile.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("cannot open the directory {}: {e}", path.display()))?;
    let dev = file.metadata().map_err(|e| format!("cannot stat {}: {e}", path.display()))?.dev();
    let mountinfo = read_proc("/proc/self/mountinfo")?;
    let dev = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let mount = find_mount(&mountinfo, &path, Some(dev))
        .ok_or_else(|| format!("no mount of /proc/self/mountinfo holds {}", path.display()))?;
    let figures = nix::sys::statvfs::fstatvfs(&file).ok().map(|s| Figures::of(&s));
    Ok(families(&mount, figures.as_ref()))
}

/// The families of a mount and its figures (`None`: `statvfs` failed).
pub(crate) fn families(mount: &Mount, figures: Option<&Figures>) -> Vec<SnapFamily> {
    let labels = [mount.device.as_str(), mount.fstype.as_str(), mount.mountpoint.as_str()];
    let mut fams = Vec::new();
    let mut one = |name: &str, help: &str, v: f64| {
        let mut f = Fam::gauge(name, help, LABELS);
        f.push(&labels, v);
        fams.push(f);
    };
    if let Some(f) = figures {
        one("node_filesystem_size_bytes", "Filesystem size in bytes.", f.size);
        one("node_filesystem_free_bytes", "Filesystem free space in bytes.", f.free);
        one("node_filesystem_avail_bytes", "Filesystem space available to non-root users in bytes.", f.avail);
        one("node_filesystem_files", "Filesystem total file nodes.", f.files);
        one("node_filesystem_files_free", "Filesystem total free file nodes.", f.files_free);
        one(
            "node_filesystem_readonly",
            "Filesystem read-only status.",
            f64::from(u8::from(f.readonly || mount.ro)),
        );
    }
    one(
        "node_filesystem_device_error",
        "Whether an error occurred while getting statistics for the given device.",
        f64::from(u8::from(figures.is_none())),
    );
    finish(fams)
}

/// The mount of `mountinfo`'s text that holds `path` (canonical): the longest mount point that
/// is a prefix of it, preferring those on `dev` (major, minor), the last listed among equals.
pub(crate) fn find_mount(mountinfo: &[u8], path: &Path, dev: Option<(u64, u64)>) -> Option<Mount> {
    // (on dev, mount point length, mount)
    let mut best: Option<(bool, usize, Mount)> = None;
    for line in lines(mountinfo) {
        let Ok(m) = MountInfo::from_line(&line) else { continue };
        let point = PathBuf::from(unescape(&m.mount_point.to_string_lossy()));
        if !path.starts_with(&point) {
            continue;
        }
        let on_dev = dev.is_some_and(|(major, minor)| m.majmin == format!("{major}:{minor}"));
        let len = point.as_os_str().len();
        if best.as_ref().is_some_and(|(d, l, _)| (*d, *l) > (on_dev, len)) {
            continue;
        }
        let ro = m.mount_options.contains_key("ro") || m.super_options.contains_key("ro");
        let device = m.mount_source.as_deref().map_or_else(|| "none".to_string(), unescape);
        let mount = Mount { device, mountpoint: point.to_string_lossy().into_owned(), fstype: m.fs_type, ro };
        best = Some((on_dev, len, mount));
    }
    best.map(|(_, _, m)| m)
}

/// mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash)
/// undone; anything else is kept as it is.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct =
            b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct.map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'))) {
            Some(n) if n <= 0xff => {
                out.push(n as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::families::dump;
    use super::*;

    fn recorded() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/proc/mountinfo")).expect("fixture")
    }

    fn mount(device: &str, mountpoint: &str, fstype: &str, ro: bool) -> Mount {
        Mount { device: device.into(), mountpoint: mountpoint.into(), fstype: fstype.into(), ro }
    }

    #[test]
    fn the_longest_prefix_on_the_same_device_wins() {
        let text = recorded();
        let find = |p: &str, dev| find_mount(&text, Path::new(p), dev);
        assert_eq!(find("/work/x", Some((254, 0))), Some(mount("/dev/vda", "/", "ext4", false)));
        assert_eq!(find("/work/x", None), Some(mount("/dev/vda", "/", "ext4", false)));
        // Two tmpfs stacked on /dev/shm: the last listed is on top.
        assert_eq!(find("/dev/shm/d", Some((0, 27))), Some(mount("tmpfs", "/dev/shm", "tmpfs", false)));
        assert_eq!(find("/dev/shm/d", None), Some(mount("tmpfs", "/dev/shm", "tmpfs", false)));
        // A prefix is whole components: /devices is not under /dev.
        assert_eq!(find("/devices", None), Some(mount("/dev/vda", "/", "ext4", false)));
        assert_eq!(find("/dev/pts", None), Some(mount("devpts", "/dev/pts", "devpts", false)));
        // A read-only mount.
        assert_eq!(
            find("/mnt/sandboxing/model_tools_env/v1/python/lib", None),
            Some(mount(
                "model_tools_unavailable",
                "/mnt/sandboxing/model_tools_env/v1/python",
                "tmpfs",
                true
            ))
        );
        // st_dev beats length: a directory of / under a mount point it is not on (a bind of
        // another filesystem over a prefix shows as a longer, wrong prefix).
        assert_eq!(find("/sys/fs/cgroup/cpu/x", Some((254, 0))), Some(mount("/dev/vda", "/", "ext4", false)));
        assert_eq!(find("relative", None), None);
    }

    #[test]
    fn escapes_and_odd_lines() {
        let text = b"garbage line\n\
            27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
            90 27 0:50 / /srv/my\\040dir ro,relatime shared:5 - tmpfs my\\134src rw\n\
            91 27 0:51 / /srv/\xffodd rw - tmpfs tmpfs rw\n\
            92 27 0:52 / /srv/short rw -\n\
            93 27 0:53 / /srv/nosrc rw - fuse.x  ro\n";
        let find = |p: &str| find_mount(text, Path::new(p), None);
        assert_eq!(find("/srv/my dir/a"), Some(mount("my\\src", "/srv/my dir", "tmpfs", true)));
        assert_eq!(find("/srv/short/a"), Some(mount("/dev/vda", "/", "ext4", false)));
        assert_eq!(find("/srv/nosrc/a"), Some(mount("none", "/srv/nosrc", "fuse.x", true)));
        assert_eq!(find("/srv/\u{fffd}odd"), Some(mount("tmpfs", "/srv/\u{fffd}odd", "tmpfs", false)));
        assert_eq!(unescape("a\\040b\\011c\\\\d\\9e\\777\\04"), "a b\tc\\\\d\\9e\\777\\04");
    }

    #[test]
    fn families_of_figures_and_of_an_error() {
        let m = mount("/dev/vda", "/", "ext4", false);
        let f = Figures {
            size: 1e12,
            free: 5e11,
            avail: 4.5e11,
            files: 65536.0,
            files_free: 1000.0,
            readonly: false,
        };
        let l = "device=\"/dev/vda\",fstype=\"ext4\",mountpoint=\"/\"";
        assert_eq!(
            dump(&families(&m, Some(&f))),
            [
                format!("gauge node_filesystem_size_bytes{{{l}}} 1000000000000"),
                format!("gauge node_filesystem_free_bytes{{{l}}} 500000000000"),
                format!("gauge node_filesystem_avail_bytes{{{l}}} 450000000000"),
                format!("gauge node_filesystem_files{{{l}}} 65536"),
                format!("gauge node_filesystem_files_free{{{l}}} 1000"),
                format!("gauge node_filesystem_readonly{{{l}}} 0"),
                format!("gauge node_filesystem_device_error{{{l}}} 0"),
            ]
        );
        let ro = mount("/dev/vda", "/", "ext4", true);
        let got = dump(&families(&ro, Some(&f)));
        assert_eq!(got[5], format!("gauge node_filesystem_readonly{{{l}}} 1"));
        assert_eq!(dump(&families(&m, None)), [format!("gauge node_filesystem_device_error{{{l}}} 1")]);
    }

    /// Unmounts when dropped.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    /// A tmpfs of 64 MiB and 1000 inodes mounted for the test: exact figures.
    #[test]
    fn a_tmpfs_mounted_here() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = std::fs::canonicalize(tmp.path()).expect("canonical");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m,nr_inodes=1000", "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            println!("skipped: cannot mount a tmpfs here ({status:?}; needs root)");
            return;
        }
        let _mounted = Mounted(dir.clone());
        let sub = dir.join("multiproc");
        std::fs::create_dir(&sub).expect("mkdir");
        for d in [&dir, &sub] {
            let fams = read(d).expect("read");
            let l = format!("device=\"tmpfs\",fstype=\"tmpfs\",mountpoint=\"{}\"", dir.display());
            let got = dump(&fams);
            assert_eq!(got.len(), 7, "{got:?}");
            assert_eq!(got[0], format!("gauge node_filesystem_size_bytes{{{l}}} 67108864"));
            assert_eq!(got[1], format!("gauge node_filesystem_free_bytes{{{l}}} 67108864"));
            assert_eq!(got[2], format!("gauge node_filesystem_avail_bytes{{{l}}} 67108864"));
            assert_eq!(got[3], format!("gauge node_filesystem_files{{{l}}} 1000"));
            // The root and `multiproc` take an inode each.
            assert_eq!(got[4], format!("gauge node_filesystem_files_free{{{l}}} 998"));
            assert_eq!(got[5], format!("gauge node_filesystem_readonly{{{l}}} 0"));
            assert_eq!(got[6], format!("gauge node_filesystem_device_error{{{l}}} 0"));
        }
        std::fs::write(sub.join("f"), vec![1u8; 8192]).expect("write");
        let fams = read(&sub).expect("read");
        let got = dump(&fams);
        assert!(got[1].ends_with(" 67100672"), "{}", got[1]);
        assert!(got[4].ends_with(" 997"), "{}", got[4]);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let e = read(Path::new("/no/such/dir")).unwrap_err();
        assert!(e.starts_with("cannot resolve /no/such/dir: "), "{e}");
    }

    /// On this machine: the directory of the tests is on some mount, with all seven families.
    #[test]
    fn reads_this_machine() {
        let fams = read(Path::new(env!("CARGO_MANIFEST_DIR"))).expect("read");
        assert_eq!(fams.len(), 7);
        assert!(fams.iter().all(|f| f.series.len() == 1));
    }
}
