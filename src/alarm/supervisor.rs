//! supervisord's event-listener protocol: `shmetrics supervisor-listener`. (Being written.)
