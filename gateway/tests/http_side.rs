//! The gateway's HTTP side (`--http-listen`) over TLS with an API key, spoken to by curl: the
//! page's assets are open, gRPC-Web needs the key and reaches the real handlers, HTTP/2 is
//! negotiated, plaintext gets nothing. No workers: RegisterImage of a bad file is answered by the
//! gateway itself.

use std::process::Command;
use std::time::Duration;

use gateway::config::GatewayArgs;
use osprey_test_support::{fixture, parse_args};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn tls_fixture(name: &str) -> String {
    fixture("tls").join(name).display().to_string()
}

/// curl with the test CA; returns (status line and headers, body).
fn curl(url: &str, extra: &[&str]) -> (String, Vec<u8>) {
    let headers = std::env::temp_dir().join(format!("osprey-http-side-{}-headers", std::process::id()));
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", &tls_fixture("ca.pem"), "-D"])
        .arg(&headers)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl runs");
    assert!(output.status.success(), "curl {url}: {}", String::from_utf8_lossy(&output.stderr));
    let head = std::fs::read_to_string(&headers).unwrap();
    let _ = std::fs::remove_file(&headers);
    (head, output.stdout)
}

/// A gRPC-Web call with a length-prefixed message; returns the grpc-status and grpc-message,
/// from the headers (trailers-only answers) or the trailer frame.
fn grpc_web(url: &str, message: &[u8], key: Option<&str>) -> (String, String) {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let body = std::env::temp_dir().join(format!("osprey-http-side-{}-body", std::process::id()));
    std::fs::write(&body, frame).unwrap();
    let data = format!("@{}", body.display());
    // HTTP/2: a refused key's body is read before the answer, so no stream reset follows it
    // (curl reports one as an error); HTTP/1.1 is the next test's.
    let mut args = vec![
        "--http2",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc-web+proto",
        "--data-binary",
        &data,
    ];
    let key_header = key.map(|key| format!("x-api-key: {key}"));
    if let Some(header) = &key_header {
        args.extend(["-H", header]);
    }
    let (head, body_bytes) = curl(url, &args);
    let trailers = String::from_utf8_lossy(&body_bytes).to_string();
    let text = format!("{head}\n{trailers}").to_lowercase();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    (field("grpc-status"), field("grpc-message"))
}

/// A gateway with unreachable workers, serving HTTP on `http` behind the key `sesame`, with `extra`
/// flags; its stop signal and its task (to check that it shuts down cleanly).
async fn start_gateway(http: &str, extra: &[&str]) -> (oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
    let mut argv = vec!["g", "--vision-workers", "127.0.0.1:9", "--llm-workers", "127.0.0.1:9"];
    argv.extend(["--http-listen", http, "--api-key", "sesame"]);
    argv.extend_from_slice(extra);
    let args: GatewayArgs = parse_args(argv);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(gateway::service::run(args, listener, async {
        let _ = stopped.await;
    }));
    (stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_side_serves_the_page_and_grpc_web_over_tls_behind_the_key() {
    let http_port = osprey_test_support::free_port();
    let http = format!("127.0.0.1:{http_port}");
    let (cert, key) = (tls_fixture("server.pem"), tls_fixture("server.key"));
    let (stop, server) = start_gateway(&http, &["--tls-cert", &cert, "--tls-key", &key]).await;
    let base = format!("https://localhost:{http_port}");

    tokio::task::spawn_blocking(move || {
        let mut ready = false;
        for _ in 0..200 {
            let probe = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "--cacert", &tls_fixture("ca.pem"), &format!("{base}/")])
                .status()
                .unwrap();
            if probe.success() {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(ready, "the HTTP side did not come up on {base}");

        // The page, without a key, over HTTP/2 (ALPN).
        let (head, body) = curl(&format!("{base}/"), &["--http2"]);
        assert!(head.starts_with("HTTP/2 200"), "{head}");
        assert!(head.to_lowercase().contains("content-type: text/html"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains("<script src=\"/app.js\">"));
        let (head, body) = curl(&format!("{base}/app.js"), &["--http1.1"]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let committed =
            std::fs::read(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web/dist/app.js"))
                .unwrap();
        assert_eq!(body, committed, "/app.js is the committed bundle");
        let (head, _) = curl(&format!("{base}/no-such-page"), &[]);
        assert!(head.contains(" 404"), "{head}");

        // gRPC-Web: the key is checked, then the real handler answers (a bad file: INVALID_ARGUMENT).
        let register = format!("{base}/osprey.v1.Osprey/RegisterImage");
        let junk = [&[0x0a, 4][..], b"junk"].concat(); // RegisterImageRequest { encoded: "junk" }
        let (status, message) = grpc_web(&register, &junk, None);
        assert_eq!(status, "16", "no key: UNAUTHENTICATED ({message})");
        let (status, _) = grpc_web(&register, &junk, Some("sesam"));
        assert_eq!(status, "16", "wrong key");
        let (status, message) = grpc_web(&register, &junk, Some("sesame"));
        assert_eq!(status, "3", "the right key reaches the handler: INVALID_ARGUMENT ({message})");
        assert!(!message.is_empty());

        // Plaintext HTTP on the TLS port gets no page.
        let plain = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{http}/"),
            ])
            .output()
            .unwrap();
        assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
    })
    .await
    .unwrap();

    // Both sides stop together.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), server).await.expect("shutdown").unwrap().unwrap();
}

/// A refused key on a large upload, sent as a browser sends it over HTTP/1.1 (the headers, then
/// the body in pieces): the client gets UNAUTHENTICATED with its message, not a reset connection
/// (the gateway reads the refused body before answering), and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_on_a_large_upload_gets_its_answer_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http_port = osprey_test_support::free_port();
    let http = format!("127.0.0.1:{http_port}");
    let (stop, server) = start_gateway(&http, &[]).await;
    let mut connection = None;
    for _ in 0..200 {
        if let Ok(stream) = tokio::net::TcpStream::connect(&http).await {
            connection = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut connection = connection.expect("the HTTP side comes up");

    // RegisterImageRequest { encoded: 4 MiB }, in a gRPC-Web frame.
    let image = vec![7u8; 4 << 20];
    let mut message = vec![0x0a];
    let mut length = image.len();
    while length >= 0x80 {
        message.push((length as u8 & 0x7f) | 0x80);
        length >>= 7;
    }
    message.push(length as u8);
    message.extend_from_slice(&image);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);

    for attempt in 0..2 {
        let head = format!(
            "POST /osprey.v1.Osprey/RegisterImage HTTP/1.1\r\nhost: {http}\r\n\
             content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\nx-api-key: open sesame\r\n\
             content-length: {}\r\n\r\n",
            frame.len()
        );
        connection.write_all(head.as_bytes()).await.unwrap();
        // Let the gateway see the headers (and, unfixed, answer and close) before the body comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for piece in frame.chunks(256 << 10) {
            let written = connection.write_all(piece).await;
            assert!(written.is_ok(), "attempt {attempt}: the upload was cut off: {written:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(30), connection.read(&mut buffer))
                .await
                .expect("an answer in time");
            let read = read.unwrap_or_else(|e| panic!("attempt {attempt}: reading the answer: {e}"));
            assert!(
                read > 0,
                "attempt {attempt}: closed without an answer: {}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buffer[..read]);
        }
        let head = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("grpc-status: 16"), "UNAUTHENTICATED: {head}");
        assert!(head.contains("grpc-message: missing%20or%20invalid%20api%20key"), "{head}");
        // A trailers-only answer has an empty body; the second attempt reuses the connection.
        assert!(head.contains("content-length: 0"), "{head}");
    }

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), server).await.expect("shutdown").unwrap().unwrap();
}
