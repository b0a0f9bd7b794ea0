import CoreMetrics
import StageFSCore

/// The gateway's metrics (`gateway --metrics`): requests by operation with the time to carry
/// each out (until its reply is ready), the ones answered with an error (a name that is not
/// there aside), and the connections open. A client (a mount through a gateway) times its
/// round trips to the gateway.
enum GatewayMetrics {
    static let requests: [Op: CoreMetrics.Timer] = Dictionary(
        uniqueKeysWithValues: Op.allCases.map {
            ($0, CoreMetrics.Timer(label: "stagefs_gateway_request_durations_histogram_seconds", dimensions: [("op", "\($0)")]))
        })
    static let errors = CoreMetrics.Counter(label: "stagefs_gateway_request_errors")
    static let connections = Meter(label: "stagefs_gateway_connections")
    static let client = CoreMetrics.Timer(label: "stagefs_gateway_round_trip_durations_histogram_seconds")
}
