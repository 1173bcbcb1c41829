//! One deadline per request: the client's `grpc-timeout` when it sends one, capped by the
//! configured default. The whole request runs under it, and every worker call carries the time
//! left (as its own `grpc-timeout`), so a worker stops when the request can no longer use its answer.

use std::future::Future;
use std::time::Duration;

use osprey_common::ServiceError;
use osprey_common::telemetry::inject_trace_context;
use tokio::time::Instant;
use tonic::Request;

/// When a request must be answered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(Instant);

impl Deadline {
    /// The deadline of a request arriving now: its `grpc-timeout`, or `default` when it sends none
    /// or a longer one.
    pub fn of_request<T>(request: &Request<T>, default: Duration) -> Self {
        let default = Self::after(default);
        Self::of_client(request).map_or(default, |client| client.min(default))
    }

    /// The deadline the client set with `grpc-timeout`, if any.
    pub fn of_client<T>(request: &Request<T>) -> Option<Self> {
        let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
        parse_grpc_timeout(value).map(Self::after)
    }

    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Self) -> Self {
        Self(self.0.min(other.0))
    }

    /// The time left, or DEADLINE_EXCEEDED when none is.
    pub fn remaining(&self) -> Result<Duration, ServiceError> {
        let left = self.0.saturating_duration_since(Instant::now());
        if left.is_zero() { Err(exceeded()) } else { Ok(left) }
    }

    /// Runs `work`, ending it with DEADLINE_EXCEEDED if it is not done in time.
    pub async fn run<T>(
        self,
        work: impl Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, ServiceError> {
        tokio::time::timeout_at(self.0, work).await.unwrap_or_else(|_| Err(exceeded()))
    }

    /// A call to a worker: this request's trace context, and the time left as `grpc-timeout` (the
    /// worker stops when it passes; dropping the call, when the client cancels, resets the stream).
    pub fn worker_request<T>(&self, message: T) -> Result<Request<T>, ServiceError> {
        let mut request = inject_trace_context(Request::new(message));
        request.set_timeout(self.remaining()?);
        Ok(request)
    }
}

fn exceeded() -> ServiceError {
    ServiceError::DeadlineExceeded("the request ran past its deadline".into())
}

/// A `grpc-timeout` header value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_grpc_timeout("90000000u"), Some(Duration::from_secs(90)));
        assert_eq!(parse_grpc_timeout("3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "12", "1x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_shorter_of_client_and_default_wins() {
        let mut request = Request::new(());
        let default = Duration::from_secs(600);
        let open = Deadline::of_request(&request, default).remaining().unwrap();
        assert!(open > Duration::from_secs(599) && open <= default, "{open:?}");

        request.set_timeout(Duration::from_secs(3));
        let client = Deadline::of_request(&request, default).remaining().unwrap();
        assert!(client > Duration::from_secs(2) && client <= Duration::from_secs(3), "{client:?}");

        request.set_timeout(Duration::from_secs(6000));
        assert!(Deadline::of_request(&request, default).remaining().unwrap() <= default);
    }

    #[tokio::test]
    async fn worker_calls_carry_the_time_left() {
        let deadline = Deadline::after(Duration::from_secs(90));
        let request = deadline.worker_request(()).unwrap();
        let header = request.metadata().get("grpc-timeout").expect("grpc-timeout set");
        let sent = parse_grpc_timeout(header.to_str().unwrap()).unwrap();
        assert!(sent <= Duration::from_secs(90) && sent > Duration::from_secs(89), "{sent:?}");
    }

    #[tokio::test]
    async fn past_the_deadline_nothing_runs() {
        let deadline = Deadline::after(Duration::from_millis(20));
        let slow = deadline.run(async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(())
        });
        assert!(matches!(slow.await, Err(ServiceError::DeadlineExceeded(_))));
        assert!(matches!(deadline.remaining(), Err(ServiceError::DeadlineExceeded(_))));
        assert!(matches!(deadline.worker_request(()), Err(ServiceError::DeadlineExceeded(_))));
    }
}
