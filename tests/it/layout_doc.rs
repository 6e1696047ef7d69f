//! `shm-layout.md` and the code agree: the worked example is the real writer's output byte for
//! byte, its records decode to what the document says, and the document's tables of header fields,
//! gauge modes and constants match the constants in `shmetrics::layout`.
//!
//! To regenerate the dump after an intentional format change:
//! `SHMETRICS_PRINT_EXAMPLE=1 cargo test --test it layout_doc -- --nocapture`, then paste it into
//! the document (and bump the format version if old readers cannot read the new bytes).

use shmetrics::layout::{
    self, decode_record, flags, header, kind, record_len, GaugeMode, MetricDesc, MetricType, Record,
    ValueType,
};
use shmetrics::writer::Registry;

/// The document, as shipped.
const DOC: &str = include_str!("../../shm-layout.md");

/// Fixed values the document shows for the fields that differ from run to run.
const DOC_PID: u64 = 4242;
const DOC_START_TIME_NS: u64 = 1_700_000_000_000_000_000;
const DOC_FILE_ID: [u8; 16] =
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
const DOC_PARENT_PID: u64 = 0;

/// The lines strictly between the line `begin` and the line `end` of the document.
fn doc_section(begin: &str, end: &str) -> Vec<&'static str> {
    let mut lines = DOC.lines();
    lines.by_ref().find(|l| l.trim() == begin).unwrap_or_else(|| panic!("shm-layout.md has no line {begin}"));
    let section: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != end).collect();
    assert!(DOC.lines().any(|l| l.trim() == end), "shm-layout.md has no line {end}");
    section
}

/// The contents of the one fenced code block between `begin` and `end`, one `\n` per line.
fn doc_code_block(begin: &str, end: &str) -> String {
    let section = doc_section(begin, end);
    let fences: Vec<usize> = (0..section.len()).filter(|&i| section[i].starts_with("```")).collect();
    assert_eq!(fences.len(), 2, "expected one fenced block between {begin} and {end}");
    section[fences[0] + 1..fences[1]].iter().map(|l| format!("{l}\n")).collect()
}

/// The cells of the data rows of the Markdown tables between `begin` and `end`.
fn doc_table_rows(begin: &str, end: &str) -> Vec<Vec<String>> {
    doc_section(begin, end)
        .into_iter()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect::<Vec<String>>()
        })
        // Drop header rows (first cell not a number) and separator rows (`---`).
        .filter(|cells| parse_num(&cells[0]).is_some())
        .collect()
}

/// Parses `123`, `0x7b` or `64 KiB`-free plain numbers as they appear in the tables.
fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `hexdump -C` of `bytes`: 16 bytes a line, runs of identical lines squeezed to `*`, and a last
/// line with the length.
fn hexdump_c(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut prev: Option<&[u8]> = None;
    let mut squeezing = false;
    for (i, line) in bytes.chunks(16).enumerate() {
        if line.len() == 16 && prev == Some(line) {
            if !squeezing {
                out.push_str("*\n");
                squeezing = true;
            }
            continue;
        }
        squeezing = false;
        prev = Some(line);
        out.push_str(&format!("{:08x} ", i * 16));
        for j in 0..16 {
            if j % 8 == 0 {
                out.push(' ');
            }
            match line.get(j) {
                Some(b) => out.push_str(&format!("{b:02x} ")),
                None => out.push_str("   "),
            }
        }
        out.push_str(" |");
        for &b in line {
            out.push(if (0x20..0x7f).contains(&b) { b as char } else { '.' });
        }
        out.push_str("|\n");
    }
    out.push_str(&format!("{:08x}\n", bytes.len()));
    out
}

fn u64_at(bytes: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"))
}

fn put_u64(bytes: &mut [u8], off: u64, v: u64) {
    let o = off as usize;
    bytes[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes the example of the document with the real writer; returns the file's bytes up to `used`,
/// with the run-dependent header fields replaced by the document's fixed values.
fn example_file() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::open(dir.path()).expect("open registry");
    let jobs = registry.counter("jobs_total", "Jobs done.").expect("counter");
    for _ in 0..3 {
        jobs.inc();
    }
    let latency = registry
        .histogram_family("latency_seconds", "Request latency.", &[0.1, 1.0], &["method"])
        .expect("histogram");
    let get = latency.with_labels(&["GET"]).expect("series");
    get.observe(0.05);
    get.observe(0.5);
    fixed_header(&registry)
}

/// The timestamp the second worked example shows in the info and enum slots.
const DOC_SET_NS: u64 = 1_700_000_001_000_000_000;

/// Writes the second example of the document (section 12.2): the file's bytes up to `used`, with
/// the header fixed as in [`example_file`] and the info's and the enum's timestamps set to
/// [`DOC_SET_NS`].
fn typed_example_file() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::open(dir.path()).expect("open registry");
    let rpc = registry.summary("rpc_seconds", "RPC time.").expect("summary");
    rpc.observe(0.5);
    rpc.observe(0.25);
    let build = registry.info("build_info", "Build.").expect("info");
    build.set(&[("version", "1.2")]).expect("info set");
    let state = registry.enum_metric("state", "State.", &["up", "down"]).expect("enum");
    state.set("down").expect("enum set");
    let mut bytes = fixed_header(&registry);
    // The two timestamps: slot 0 of the info series (record 4), slot 1 of the enum series (6).
    let records = records_of(&bytes);
    let slot = |i: usize| match &records[i].2 {
        Record::TypedSeries { slots_offset, .. } => (records[i].0 + *slots_offset as usize) as u64,
        r => panic!("record {i} is {r:?}"),
    };
    for at in [slot(3), slot(5) + 8] {
        assert!(u64_at(&bytes, at) > DOC_START_TIME_NS, "a timestamp of this run");
        put_u64(&mut bytes, at, DOC_SET_NS);
    }
    bytes
}

/// Every record of a file's bytes (up to `used`): offset, length, decoded.
fn records_of(bytes: &[u8]) -> Vec<(usize, usize, Record)> {
    let mut records = Vec::new();
    let mut off = layout::HEADER_SIZE as usize;
    while off < bytes.len() {
        let len = record_len(&bytes[off..]).expect("record length");
        let record = decode_record(&bytes[off..off + len]).expect("record decodes");
        records.push((off, len, record));
        off += len;
    }
    assert_eq!(off, bytes.len(), "records end exactly at `used`");
    records
}

/// The registry's file up to `used`, its run-dependent header fields (checked first) replaced by
/// the document's fixed values.
fn fixed_header(registry: &Registry) -> Vec<u8> {
    let path = registry.path().expect("registry has a file");
    let mut bytes = std::fs::read(&path).expect("read the writer's file");
    let used = u64_at(&bytes, header::USED);
    assert!(used <= bytes.len() as u64, "used {used} is past the end of the file");
    bytes.truncate(used as usize);

    // The fields the document fixes are the ones that depend on the run; check what they held.
    let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8 file name");
    let pid = u64_at(&bytes, header::PID);
    assert_eq!(pid, u64::from(std::process::id()));
    let id = header::FILE_ID as usize;
    let file_id: [u8; 16] = bytes[id..id + 16].try_into().expect("16 bytes");
    assert_eq!(name, format!("w-{pid}-{}.shm", layout::file_id_hex(&file_id)));
    assert_eq!(u64_at(&bytes, header::PARENT_PID), 0);
    assert!(u64_at(&bytes, header::START_TIME_NS) > DOC_START_TIME_NS);

    put_u64(&mut bytes, header::PID, DOC_PID);
    put_u64(&mut bytes, header::START_TIME_NS, DOC_START_TIME_NS);
    bytes[id..id + 16].copy_from_slice(&DOC_FILE_ID);
    put_u64(&mut bytes, header::PARENT_PID, DOC_PARENT_PID);
    bytes
}

#[test]
fn worked_example_matches_the_writer() {
    let bytes = example_file();
    let dump = hexdump_c(&bytes);
    if std::env::var_os("SHMETRICS_PRINT_EXAMPLE").is_some() {
        println!("{dump}");
    }
    let documented = doc_code_block("<!-- worked-example-begin -->", "<!-- worked-example-end -->");
    assert_eq!(documented, dump, "the worked example in shm-layout.md differs from what the writer produces");

    // The header, field by field.
    layout::check_header(&bytes).expect("valid header");
    assert_eq!(&bytes[..8], b"SHMETRIC");
    assert_eq!(u64_at(&bytes, header::USED), bytes.len() as u64);
    assert_eq!(u64_at(&bytes, header::FLAGS), 0);
    assert_eq!(u64_at(&bytes, header::DROPPED_SERIES), 0);
    assert_eq!(u64_at(&bytes, header::DROPPED_UPDATES), 0);
    assert_eq!(u64_at(&bytes, header::RESERVE), shmetrics::writer::DEFAULT_RESERVE);
    assert_eq!(u64_at(&bytes, header::SHARED_FORKS), 0);
    assert!(bytes[header::END as usize..layout::HEADER_SIZE as usize].iter().all(|b| *b == 0));

    // The records, decoded with the library's own decoder.
    let records = records_of(&bytes);

    let jobs = MetricDesc {
        name: "jobs".into(),
        help: "Jobs done.".into(),
        metric_type: MetricType::Counter,
        value_type: ValueType::U64,
        gauge_mode: None,
        label_names: vec![],
        buckets: vec![],
        states: Vec::new(),
    };
    let latency = MetricDesc {
        name: "latency_seconds".into(),
        help: "Request latency.".into(),
        metric_type: MetricType::Histogram,
        value_type: ValueType::F64,
        gauge_mode: None,
        label_names: vec!["method".into()],
        buckets: vec![0.1, 1.0],
        states: Vec::new(),
    };
    let expected = vec![
        (0x1000, 48, Record::Metric { id: 0, desc: jobs }),
        (0x1030, 32, Record::Series { metric_id: 0, label_values: vec![], slots: 1, slots_offset: 24 }),
        (0x1050, 96, Record::Metric { id: 1, desc: latency }),
        (
            0x10b0,
            64,
            Record::Series { metric_id: 1, label_values: vec!["GET".into()], slots: 4, slots_offset: 32 },
        ),
    ];
    assert_eq!(records, expected);

    // The value slots.
    assert_eq!(u64_at(&bytes, 0x1030 + 24), 3, "jobs");
    let hist = 0x10b0 + 32;
    assert_eq!(u64_at(&bytes, hist), 1, "bucket le=0.1");
    assert_eq!(u64_at(&bytes, hist + 8), 1, "bucket le=1.0");
    assert_eq!(u64_at(&bytes, hist + 16), 0, "bucket le=+Inf");
    assert_eq!(f64::from_bits(u64_at(&bytes, hist + 24)), 0.0 + 0.05 + 0.5, "sum");
}

#[test]
fn header_table_matches_the_constants() {
    let rows = doc_table_rows("<!-- header-table-begin -->", "<!-- header-table-end -->");
    let fields: Vec<(u64, u64, &str)> = rows
        .iter()
        .map(|r| (parse_num(&r[0]).expect("offset"), parse_num(&r[1]).expect("size"), r[3].as_str()))
        .collect();
    let expected = [
        (header::MAGIC, 8, "magic"),
        (header::VERSION, 4, "version"),
        (header::HEADER_SIZE, 4, "header_size"),
        (header::USED, 8, "used"),
        (header::FLAGS, 8, "flags"),
        (header::PID, 8, "pid"),
        (header::START_TIME_NS, 8, "start_time_ns"),
        (header::FILE_ID, 16, "file_id"),
        (header::DROPPED_SERIES, 8, "dropped_series"),
        (header::DROPPED_UPDATES, 8, "dropped_updates"),
        (header::RESERVE, 8, "reserve"),
        (header::PARENT_PID, 8, "parent_pid"),
        (header::SHARED_FORKS, 8, "shared_forks"),
        (header::END, layout::HEADER_SIZE - header::END, "(zero)"),
    ];
    assert_eq!(fields, expected);
    // The fields tile the header without gaps.
    for w in fields.windows(2) {
        assert_eq!(w[0].0 + w[0].1, w[1].0, "gap or overlap after {}", w[0].2);
    }
}

#[test]
fn gauge_mode_table_matches_the_code() {
    let rows = doc_table_rows("<!-- gauge-modes-begin -->", "<!-- gauge-modes-end -->");
    let documented: Vec<(u64, &str)> =
        rows.iter().map(|r| (parse_num(&r[0]).expect("code"), r[1].as_str())).collect();
    let code: Vec<(u64, &str)> = GaugeMode::ALL.iter().map(|m| (u64::from(m.code()), m.as_str())).collect();
    assert_eq!(documented, code);
    for (r, m) in rows.iter().zip(GaugeMode::ALL) {
        assert_eq!(r[2], if m.has_timestamp() { "2" } else { "1" }, "slots of {}", m.as_str());
        assert_eq!(r[3], if m.is_live() { "dropped" } else { "kept" }, "dead writers, {}", m.as_str());
    }
}

#[test]
fn constants_table_matches_the_code() {
    let rows = doc_table_rows("<!-- constants-begin -->", "<!-- constants-end -->");
    let documented: Vec<(u64, &str)> =
        rows.iter().map(|r| (parse_num(&r[0]).expect("value"), r[1].as_str())).collect();
    let expected = [
        (u64::from(layout::VERSION), "VERSION"),
        (layout::HEADER_SIZE, "HEADER_SIZE"),
        (layout::RECORD_HEADER as u64, "RECORD_HEADER"),
        (layout::METRIC_FIXED as u64, "METRIC_FIXED"),
        (layout::SERIES_FIXED as u64, "SERIES_FIXED"),
        (layout::MAX_STRING as u64, "MAX_STRING"),
        (layout::MAX_LABELS as u64, "MAX_LABELS"),
        (layout::MAX_BUCKETS as u64, "MAX_BUCKETS"),
        (layout::MAX_STATES as u64, "MAX_STATES"),
        (u64::from(kind::METRIC), "KIND_METRIC"),
        (u64::from(kind::SERIES), "KIND_SERIES"),
        (u64::from(kind::TYPED_METRIC), "KIND_TYPED_METRIC"),
        (u64::from(kind::TYPED_SERIES), "KIND_TYPED_SERIES"),
        (flags::READY, "FLAG_READY"),
        (flags::CLEAN_EXIT, "FLAG_CLEAN_EXIT"),
    ];
    assert_eq!(documented, expected);
    assert_eq!(&layout::MAGIC, b"SHMETRIC");
}

#[test]
fn typed_worked_example_matches_the_writer() {
    let bytes = typed_example_file();
    let dump = hexdump_c(&bytes);
    if std::env::var_os("SHMETRICS_PRINT_EXAMPLE").is_some() {
        println!("{dump}");
    }
    let documented = doc_code_block("<!-- typed-example-begin -->", "<!-- typed-example-end -->");
    assert_eq!(documented, dump, "the second worked example in shm-layout.md differs from the writer's");

    let desc = |name: &str, help: &str, metric_type, value_type, states: &[&str]| MetricDesc {
        name: name.into(),
        help: help.into(),
        metric_type,
        value_type,
        gauge_mode: None,
        label_names: vec![],
        buckets: vec![],
        states: states.iter().map(|s| (*s).to_string()).collect(),
    };
    let series = |metric_id, values: &[&str], slots, slots_offset| Record::TypedSeries {
        metric_id,
        label_values: values.iter().map(|v| (*v).to_string()).collect(),
        slots,
        slots_offset,
    };
    let expected = vec![
        (
            0x1000,
            56,
            Record::Metric {
                id: 0,
                desc: desc("rpc_seconds", "RPC time.", MetricType::Summary, ValueType::F64, &[]),
            },
        ),
        (0x1038, 40, series(0, &[], 2, 24)),
        (
            0x1060,
            48,
            Record::Metric { id: 1, desc: desc("build", "Build.", MetricType::Info, ValueType::U64, &[]) },
        ),
        (0x1090, 56, series(1, &["version", "1.2"], 1, 48)),
        (
            0x10c8,
            64,
            Record::Metric {
                id: 2,
                desc: desc("state", "State.", MetricType::Enum, ValueType::U64, &["up", "down"]),
            },
        ),
        (0x1108, 40, series(2, &[], 2, 24)),
    ];
    assert_eq!(records_of(&bytes), expected);
    assert_eq!(u64_at(&bytes, 0x1038 + 24), 2, "summary count");
    assert_eq!(f64::from_bits(u64_at(&bytes, 0x1038 + 32)), 0.75, "summary sum");
    assert_eq!(u64_at(&bytes, 0x1090 + 48), DOC_SET_NS, "info timestamp");
    assert_eq!(u64_at(&bytes, 0x1108 + 24), 1, "enum state index: down");
    assert_eq!(u64_at(&bytes, 0x1108 + 32), DOC_SET_NS, "enum timestamp");
}

/// A reader of revision 2 knows kinds 1 and 2 only and skips the others by their length. Such a
/// reader is this one with the kinds 3 and 4 of a file renamed to kinds it does not know: it must
/// read that file without complaint and find exactly the kind-1/2 metrics, with their values.
#[test]
fn a_reader_that_skips_kinds_3_and_4_keeps_the_rest_of_the_file() {
    use shmetrics::aggregator::{Aggregator, Options};
    use shmetrics::expose::{encode, Format};

    let tmp = tempfile::tempdir().expect("tempdir");
    let (new_dir, old_dir) = (tmp.path().join("new"), tmp.path().join("old"));
    std::fs::create_dir(&new_dir).expect("mkdir");
    std::fs::create_dir(&old_dir).expect("mkdir");
    let registry = Registry::open(&new_dir).expect("registry");
    // Kinds 1 and 3 interleaved, series appended out of metric order.
    let jobs = registry.counter_family("jobs_total", "Jobs.", &["queue"]).expect("counter");
    let rpc = registry.summary("rpc_seconds", "RPC time.").expect("summary");
    let temp = registry.gauge("temp", "Temperature.", GaugeMode::Max).expect("gauge");
    let state = registry.enum_metric("state", "State.", &["up", "down"]).expect("enum");
    let build = registry.info("build_info", "Build.").expect("info");
    rpc.observe(2.0);
    jobs.with_labels(&["a"]).expect("series").inc_by(5);
    build.set(&[("version", "1")]).expect("info");
    temp.set(21.5);
    state.set("down").expect("state");
    jobs.with_labels(&["b"]).expect("series").inc_by(7);

    let path = registry.path().expect("file");
    let mut bytes = std::fs::read(&path).expect("read");
    let used = u64_at(&bytes, header::USED) as usize;
    let mut off = layout::HEADER_SIZE as usize;
    let mut renamed = 0;
    while off < used {
        let len = record_len(&bytes[off..used]).expect("len");
        let k = u16::from_le_bytes([bytes[off + 4], bytes[off + 5]]);
        if k == kind::TYPED_METRIC || k == kind::TYPED_SERIES {
            bytes[off + 4..off + 6].copy_from_slice(&(0x7f00 | k).to_le_bytes());
            renamed += 1;
        }
        off += len;
    }
    assert_eq!(renamed, 6, "three typed metrics and their three series");
    let name = path.file_name().expect("name");
    std::fs::write(old_dir.join(name), &bytes).expect("write the old reader's view");
    // What an old reader decodes: METRIC ids 0, 1 with no gap, series of those only.
    let old: Vec<Record> = records_of(&bytes[..used]).into_iter().map(|r| r.2).collect();
    let ids: Vec<u32> =
        old.iter().filter_map(|r| if let Record::Metric { id, .. } = r { Some(*id) } else { None }).collect();
    assert_eq!(ids, vec![0, 1]);
    assert_eq!(old.iter().filter(|r| matches!(r, Record::Unknown)).count(), 6);

    let read = |dir: &std::path::Path| {
        let opts = Options { read_only: true, ..Options::default() };
        let mut agg = Aggregator::open(dir, &opts).expect("aggregator");
        let snap = agg.scrape();
        assert!(agg.stats().bad_files.is_empty(), "{:?}", agg.stats().bad_files);
        let text = encode(&snap, Format::Prometheus);
        text.lines().filter(|l| !l.contains("shmetrics_")).map(|l| format!("{l}\n")).collect::<String>()
    };
    let plain = "\
# HELP jobs_total Jobs.
# TYPE jobs_total counter
jobs_total{queue=\"a\"} 5
jobs_total{queue=\"b\"} 7
";
    let gauge = "\
# HELP temp Temperature.
# TYPE temp gauge
temp 21.5
";
    assert_eq!(read(&old_dir), format!("{plain}{gauge}"));
    let typed = "\
# HELP build_info Build.
# TYPE build_info gauge
build_info{version=\"1\"} 1
";
    let rpc = "\
# HELP rpc_seconds RPC time.
# TYPE rpc_seconds summary
rpc_seconds_count 1.0
rpc_seconds_sum 2.0
# HELP state State.
# TYPE state gauge
state{state=\"up\"} 0
state{state=\"down\"} 1
";
    assert_eq!(read(&new_dir), format!("{typed}{plain}{rpc}{gauge}"));
}
