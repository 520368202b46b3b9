use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::resolve(
        FileConfig::parse(text, Path::new("sluice.toml"))?,
        Overrides::default(),
    )
}

#[test]
fn defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.ledger_sync, LedgerSync::Batch);
    assert_eq!(c.server, "http://127.0.0.1:8787");
    assert_eq!(c.busy_poll, None);
    assert_eq!(
        parse("busy_poll_ms = 250").unwrap().busy_poll,
        Some(Duration::from_millis(250))
    );
    assert_eq!(parse("busy_poll_ms = 0").unwrap().busy_poll, None);
    assert_eq!(c.proxy.max_body, 32 << 20);
    assert_eq!(
        parse("max_request_bytes = 4096").unwrap().proxy.max_body,
        4096
    );
}

#[test]
fn errors_name_the_key() {
    for (text, key) in [
        ("listen = \"nope\"", "listen"),
        ("ledger_sync = \"sometimes\"", "ledger_sync"),
        ("lease_check_ms = 0", "lease_check_ms"),
        ("ledger_batch_ms = 51", "ledger_batch_ms"),
        ("busy_poll_ms = 60001", "busy_poll_ms"),
        ("busy_poll_ms = -1", "busy_poll_ms"),
        ("max_request_bytes = 1023", "max_request_bytes"),
        ("max_request_bytes = 268435457", "max_request_bytes"),
        ("default_lease_s = -1.0", "default_lease_s"),
        ("server = \"ftp://x\"", "server"),
        ("lisen = \"127.0.0.1:1\"", "lisen"),
        ("lease_check_ms = \"fast\"", "lease_check_ms"),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }
}

const PROVIDER: &str = "[[providers]]\nname = \"openai\"\nformat = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\n";

#[test]
fn providers_and_models_resolve_with_builtin_or_configured_prices() {
    let text = format!(
        "{PROVIDER}[[models]]\nname = \"gpt-4o-mini\"\nprovider = \"openai\"\nfallbacks = [\"cheap\"]\n\
         [[models]]\nname = \"cheap\"\nprovider = \"openai\"\nupstream_name = \"my-model\"\n\
         input_usd_per_mtok = 0.5\noutput_usd_per_mtok = 1.5\nmax_output_tokens = 1000\n"
    );
    let c = parse(&text).unwrap();
    let m = &c.proxy.models["gpt-4o-mini"];
    assert_eq!(
        (m.price.input, m.price.output, m.max_output_tokens),
        (150_000, 600_000, 16_384)
    );
    let cheap = &c.proxy.models["cheap"];
    assert_eq!(
        (
            cheap.upstream_name.as_str(),
            cheap.price.input,
            cheap.price.cached_input
        ),
        ("my-model", 500_000, 500_000)
    );
    assert_eq!(c.proxy.providers[0].wire, Wire::OpenAi);
    assert!(!format!("{:?}", c.proxy.providers[0]).contains("sk-"));
    // Quotas: one subject per upstream model, shared by its names; none without rpm/tpm.
    let text = format!(
        "{PROVIDER}[[models]]\nname = \"a\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\nrpm = 10\ntpm = 5000\n\
         [[models]]\nname = \"b\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\n\
         [[models]]\nname = \"c\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o-mini\"\n"
    );
    let c = parse(&text).unwrap();
    let q = |m: &str| {
        c.proxy.models[m]
            .quota_subject
            .as_ref()
            .map(|s| s.as_str().to_owned())
    };
    assert_eq!(q("a").as_deref(), Some("provider:openai/gpt-4o"));
    assert_eq!(q("b"), q("a"));
    assert_eq!(q("c"), None);
    assert_eq!(
        c.proxy.quotas["provider:openai/gpt-4o"],
        Quota {
            rpm: Some(10),
            tpm: Some(5000)
        }
    );
}

#[test]
fn proxy_errors_name_the_key() {
    let model =
        |extra: &str| format!("{PROVIDER}[[models]]\nname = \"m\"\nprovider = \"openai\"\n{extra}");
    for (text, key) in [
        (
            PROVIDER.replace("\"openai\"\nbase", "\"grpc\"\nbase"),
            "providers[0].format",
        ),
        (
            PROVIDER.replace("https://", "ftp://"),
            "providers[0].base_url",
        ),
        (
            format!("{PROVIDER}api_key_env = \"SLUICE_TEST_UNSET_KEY\"\n"),
            "providers[0].api_key_env",
        ),
        (format!("{PROVIDER}{PROVIDER}"), "providers[1].name"),
        (
            format!("{PROVIDER}tls_ca_file = \"/nonexistent/ca.pem\"\n"),
            "providers[0].tls_ca_file",
        ),
        (
            // A file that is no certificate (this source file).
            format!(
                "{PROVIDER}tls_ca_file = \"{}\"\n",
                concat!(env!("CARGO_MANIFEST_DIR"), "/src/config.rs")
            ),
            "providers[0].tls_ca_file",
        ),
        (
            format!("{PROVIDER}tls_ca_file = \"/nonexistent/ca.pem\"\n")
                .replace("https://", "http://"),
            "providers[0].tls_ca_file",
        ),
        (
            model("provider = \"x\"\n").replace("provider = \"openai\"\nprovider", "provider"),
            "models[0].provider",
        ),
        (model(""), "models[0].input_usd_per_mtok"),
        (
            model("input_usd_per_mtok = 1.0\n"),
            "models[0].output_usd_per_mtok",
        ),
        (
            model("input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n"),
            "models[0].max_output_tokens",
        ),
        (
            model("input_usd_per_mtok = -1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\n"),
            "models[0].input_usd_per_mtok",
        ),
        (
            model(
                "input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\nfallbacks = [\"nope\"]\n",
            ),
            "models[0].fallbacks",
        ),
        (
            "pricing_file = \"/nonexistent/prices.json\"".to_owned(),
            "pricing_file",
        ),
        (
            model(
                "input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\nrpm = 0\n",
            ),
            "models[0].rpm",
        ),
        (
            model(
                "input_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\nmax_output_tokens = 5\ncache_write_usd_per_mtok = -2.0\n",
            ),
            "models[0].cache_write_usd_per_mtok",
        ),
        (
            // Two names for one upstream model with different quotas.
            format!(
                "{PROVIDER}[[models]]\nname = \"a\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\nrpm = 10\n\
                 [[models]]\nname = \"b\"\nprovider = \"openai\"\nupstream_name = \"gpt-4o\"\nrpm = 20\n"
            ),
            "models[1].rpm",
        ),
    ] {
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }
}

#[test]
fn store_and_database_errors_name_their_keys() {
    let dir = std::env::temp_dir().join(format!("sluice-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let redis = |rest: &str| format!("[store]\nkind = \"redis\"\n{rest}");
    for (text, key) in [
        ("[store]\nkind = \"etcd\"".to_owned(), "store.kind"),
        (redis(""), "store.url"),
        (redis("url = \"http://127.0.0.1:6379\""), "store.url"),
        (redis("url = \"redis://a:1,http://b:2\""), "store.url"),
        (redis("url = []"), "store.url"),
        (
            redis("url = [\"redis://a:1\", \"rediss://b:2\"]"),
            "store.url",
        ),
        (
            redis("url = \"redis://h\"\ntls_ca_file = \"/etc/hosts\""),
            "store.tls_ca_file",
        ),
        (
            redis("url = \"rediss://h\"\ntls_ca_file = \"/nonexistent/ca.pem\""),
            "store.tls_ca_file",
        ),
        (
            redis(&format!(
                "url = \"rediss://h\"\ntls_ca_file = {:?}",
                not_pem.display().to_string()
            )),
            "store.tls_ca_file",
        ),
        (
            redis("url = \"redis://h\"\nkey_prefix = \"a{b}\""),
            "store.key_prefix",
        ),
        (
            redis("url = \"redis://h\"\non_store_error = \"panic\""),
            "store.on_store_error",
        ),
        (
            redis("url = \"redis://h\"\ntimeout_ms = 0"),
            "store.timeout_ms",
        ),
        (redis("url = \"redis://h\"\nreplicas = 0"), "store.replicas"),
        (
            "[database]\nurl = \"mysql://h/db\"".to_owned(),
            "database.url",
        ),
    ] {
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }
    let ok = parse(&redis(
        "url = \"rediss://h:6380\"\ntls_ca_file = \"/etc/hosts\"",
    ))
    .unwrap_err();
    assert_eq!(ok.key, "store.tls_ca_file", "no PEM in /etc/hosts");
    let pem = dir.join("ca.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let c = parse(&redis(&format!(
        "url = \"rediss://h:6380\"\ntls_ca_file = {:?}",
        pem.display().to_string()
    )))
    .unwrap();
    match c.store {
        StoreConfig::Redis { url, tls_ca, .. } => {
            assert_eq!(url, "rediss://h:6380");
            assert!(tls_ca.is_some());
        }
        StoreConfig::Memory => panic!("not redis"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn store_descriptions_redact_credentials() {
    let redis = |rest: &str| format!("[store]\nkind = \"redis\"\n{rest}");
    let d = parse(&redis("url = [\"redis://u:secret@a:1\", \"redis://b:2\"]"))
        .unwrap()
        .store
        .describe();
    assert_eq!(
        d,
        "redis cluster, seed nodes redis://u:***@a:1 redis://b:2 (prefix \"sluice:\")"
    );
    let d = parse(&redis("url = \"redis://:pw@h:6379/0\""))
        .unwrap()
        .store
        .describe();
    assert!(!d.contains("pw"), "{d}");
}

#[test]
fn a_list_of_nodes_is_a_redis_cluster() {
    let redis = |rest: &str| format!("[store]\nkind = \"redis\"\n{rest}");
    for (text, want_url, want_cluster) in [
        ("url = \"redis://h:1\"", "redis://h:1", false),
        ("url = \"redis://h:1\"\ncluster = true", "redis://h:1", true),
        ("url = [\"redis://h:1\"]", "redis://h:1", true),
        (
            "url = [\"redis://a:1\", \"redis://b:2\"]",
            "redis://a:1,redis://b:2",
            true,
        ),
        (
            "url = \"redis://a:1, redis://b:2\"",
            "redis://a:1,redis://b:2",
            true,
        ),
    ] {
        match parse(&redis(text)).unwrap().store {
            StoreConfig::Redis { url, cluster, .. } => {
                assert_eq!((url.as_str(), cluster), (want_url, want_cluster), "{text}");
            }
            StoreConfig::Memory => panic!("not redis"),
        }
    }
}

#[test]
fn flags_beat_environment_beat_file() {
    let file = FileConfig::parse("listen = \"127.0.0.1:1\"", Path::new("f")).unwrap();
    let env = Overrides::from_env(|k| (k == "SLUICE_LISTEN").then(|| "127.0.0.1:2".into()));
    let c = Config::resolve(file.clone(), env.clone()).unwrap();
    assert_eq!(c.listen.port(), 2);
    let flags = Overrides {
        listen: Some("127.0.0.1:3".into()),
        ..Overrides::default()
    };
    let c = Config::resolve(file, env.overlaid_with(flags)).unwrap();
    assert_eq!(c.listen.port(), 3);
}
